"""Helpers shared by several test modules: a learnable synthetic data set, a small training config,
IDX files on disk, and the environment of a subprocess with N simulated CPU devices."""

import os
import socket

import numpy as np

from flagjax import data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS = data.synthetic_dataset(n_train=1200, n_test=300)  # learnable in a few steps


def small_config(tmp_path, **kw) -> train.TrainConfig:
    """MLP, 8 workers of which 2 ALIE attackers, FA, 4 steps of batch 8, metrics every step."""
    base = dict(
        model="mlp",
        num_workers=8,
        num_byzantine=2,
        attack="alie",
        rule="flag",
        batch_size=8,
        steps=4,
        eval_every=2,
        log_every=1,
        lr=0.05,
        out_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return train.TrainConfig(**base)


class Crash(Exception):
    """Raised by :func:`crash_at` (a training run dying mid-way)."""


def crash_at(step: int):
    """An ``on_step`` callback that raises :class:`Crash` when ``step`` is done (after its checkpoint
    would have been written, mid-way through its bookkeeping)."""

    def on_step(done, rec):
        if done == step:
            raise Crash

    return on_step


def write_idx_set(folder, n_train=30, n_test=10, mismatch=False):
    """Four Fashion-MNIST-shaped IDX files of random images in ``folder`` (one extra train label with
    ``mismatch``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    data.write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train + mismatch).astype(np.uint8))
    data.write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    data.write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test).astype(np.uint8))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(devices: int) -> dict:
    """Environment for a ``python -m flagjax.cli`` subprocess with ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FLAGJAX_DATA_DIR", None)
    env.pop("FLAGJAX_COMPILATION_CACHE", None)
    return env
