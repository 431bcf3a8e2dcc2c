"""Training-step time against ByzFL's own training loop, on the same CPU, same model, workers and batch.

Usage:
    python benchmarks/peer_step.py [--quick] [--out benchmarks/results/peer_step.md]

ByzFL's step is one iteration of its benchmark's DSGD loop (``experiments.peer_byzfl.byzfl_step``: every
honest client computes its gradient one after the other, adds its momentum, the Byzantine client crafts
its vectors, the server aggregates and steps, the clients get the new model); flagjax's step is one call of
the jitted training step (``flagjax.train.setup``), blocked on. Setting (issue 16's first measurement):
p = 10 workers of which f = 3 Byzantine (ByzFL: 7 honest clients and 3 Byzantine), batch 25 per worker,
trimmed mean, sign flipping, worker momentum 0.9, lr 0.1, on random 28 x 28 images. Models: the FA paper's
CNN (registered into ByzFL as a torch module) and ByzFL's ``cnn_mnist`` (flagjax's port ``CnnMnist``).

Also the pieces behind flagjax's figure, each a ratio in this run: forward + backward of the 250 images as
one batch (torch and JAX) and as 10 workers x 25 images (JAX: vmapped, or one gradient program per worker;
torch: one worker after the other), for the paper CNN as first written (Flax's ``nn.Conv`` and
``nn.max_pool``), with the reshape max-pool (``flagjax.models.max_pool_2x2``), and as it is now
(``flagjax.models.Conv``, whose CPU form is a GEMM on the image's shifted views for the one-channel input
and a GEMM + col2im input gradient otherwise).
Every timing is a median over repeats after warm-up, the setups of one table timed round-robin.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/

import _report  # noqa: E402  # benchmarks/_report.py
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import peer_byzfl  # noqa: E402
from flagjax import data, models, train  # noqa: E402


def round_robin(fns: dict, rounds: int, *, block: int = 1, warmup: int = 2) -> dict[str, float]:
    """Median ms of each zero-argument callable (which blocks on its own result): ``block`` calls of each
    in turn, ``rounds`` times, after ``warmup`` calls of each. With ``block > 1`` the first call of every
    block is not counted: torch's and XLA's worker threads keep spinning for a moment after their work,
    which slows whichever library runs right after the other (measured: flagjax's step 21 ms alone,
    33 ms when every other step was ByzFL's)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for i in range(block):
                t0 = time.perf_counter()
                fn()
                if block == 1 or i > 0:
                    ts[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in ts.items()}


def synthetic(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return data.Dataset("synthetic", x, y, x[:500], y[:500], 10)


def step_setups(model: str, byzfl_model: str, ds) -> dict:
    """{'flagjax': fn, 'flagjax vmap': fn, 'ByzFL': fn}: one training step each, blocking. 'flagjax' is the
    default (``worker_grads="auto"``: one gradient program per worker on CPU for these convolutional models),
    'flagjax vmap' the workers' gradients as one vmapped program (the default before)."""
    cfg = train.TrainConfig(
        dataset="synthetic",
        model=model,
        num_workers=10,
        num_byzantine=3,
        attack="signflip",
        rule="trimmed_mean",
        steps=10_000,
        num_devices=1,
        **peer_byzfl.BYZFL_OPTIMISATION,
    )
    out = {}
    for label, mode in (("flagjax", "auto"), ("flagjax vmap", "vmap")):
        su = train.setup(dataclasses.replace(cfg, worker_grads=mode), ds)
        box = {"state": su.state, "i": 0}

        def fx(su=su, box=box):
            x, y = su.batch(box["i"])
            box["i"] += 1
            box["state"], m = su.step(box["state"], x, y)
            jax.block_until_ready(m)

        out[label] = fx

    spec = {"agg": {"name": "TrMean", "parameters": {"f": 3}}, "pre": [], "attack": "SignFlipping"}
    clients, byz, server = peer_byzfl.byzfl_training(cfg, spec, ds, model_name=byzfl_model)
    return {**out, "ByzFL": lambda: peer_byzfl.byzfl_step(clients, byz, server)}


class _PoolCNN(nn.Module):
    """The paper CNN as it was first written: Flax's nn.Conv and reduce_window max-pool."""

    pool: str = "reduce_window"

    @nn.compact
    def __call__(self, x, train: bool = False):
        pool = (lambda x: nn.max_pool(x, (2, 2), (2, 2))) if self.pool == "reduce_window" else models.max_pool_2x2
        x = nn.relu(pool(nn.Conv(10, (5, 5), padding="VALID")(x)))
        x = nn.relu(pool(nn.Conv(20, (5, 5), padding="VALID")(x)))
        x = nn.relu(nn.Dense(50)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def piece_setups() -> dict:
    """Forward + backward of 250 images for the paper CNN as written before and now: one batch, 10 workers
    x 25 images vmapped, and 10 x 25 as one gradient program per worker (``worker_grads="loop"``, the CPU
    default for convolutional models); torch's one batch and its 10 x 25 one after the other (as ByzFL's
    clients)."""
    import torch

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(10, 25, 28, 28, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, (10, 25)).astype(np.int32))
    out = {}
    variants = (
        ("nn.Conv, nn.max_pool", _PoolCNN(), ("one", "vmap")),
        ("nn.Conv, max_pool_2x2", _PoolCNN(pool="reshape"), ("vmap", "loop")),
        ("PaperCNN (models.Conv, max_pool_2x2)", models.PaperCNN(), ("one", "vmap", "loop")),
    )
    for label, mdl, kinds in variants:
        params = mdl.init(jax.random.key(0), x[0])["params"]

        def loss(p, xb, yb, mdl=mdl):
            return optax.softmax_cross_entropy_with_integer_labels(mdl.apply({"params": p}, xb), yb).mean()

        g = jax.grad(loss)
        fns = {
            "one": (
                f"JAX one batch, {label}",
                jax.jit(lambda p, x, y, g=g: g(p, x.reshape(250, 28, 28, 1), y.reshape(250))),
            ),
            "vmap": (f"JAX 10 x 25 vmapped, {label}", jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))),
            "loop": (
                f"JAX 10 x 25 one program per worker, {label}",
                jax.jit(lambda p, x, y, g=g: [g(p, x[i], y[i]) for i in range(x.shape[0])]),
            ),
        }
        for kind in kinds:
            name, fn = fns[kind]
            out[name] = lambda fn=fn, params=params: jax.block_until_ready(fn(params, x, y))
    peer_byzfl.register_paper_cnn()
    net = peer_byzfl.byzfl_module("fed_framework.models").paper_cnn()
    tx = torch.from_numpy(np.asarray(x).transpose(0, 1, 4, 2, 3).copy())
    ty = torch.from_numpy(np.asarray(y).astype(np.int64))

    def torch_fb():
        net.zero_grad()
        torch.nn.functional.nll_loss(net(tx.reshape(250, 1, 28, 28)), ty.reshape(250)).backward()

    def torch_workers():
        for i in range(10):
            net.zero_grad()
            torch.nn.functional.nll_loss(net(tx[i]), ty[i]).backward()

    out["torch one batch"] = torch_fb
    out["torch 10 x 25 one after the other"] = torch_workers
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else 8
    import torch

    peer_byzfl.register_paper_cnn()
    ds = synthetic()
    rows = []
    for model, bmodel in (("cnn", "paper_cnn"), ("cnn_mnist", "cnn_mnist")):
        t = round_robin(step_setups(model, bmodel, ds), rounds, block=10)
        rows.append((model, t["flagjax"], t["flagjax vmap"], t["ByzFL"]))
        print(model, {k: round(v, 2) for k, v in t.items()}, flush=True)
    pieces = round_robin(piece_setups(), rounds, block=5)
    print({k: round(v, 2) for k, v in pieces.items()}, flush=True)
    cmd = (
        "python benchmarks/peer_step.py"
        + (" --quick" if args.quick else "")
        + (f" --out {args.out}" if args.out else "")
    )
    lines = [
        "# Training step against ByzFL's own loop",
        "",
        f"Produced by `{cmd}` on {platform.machine()} with {os.cpu_count()} CPU cores; JAX {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{peer_byzfl.versions()}.",
        "",
        "p = 10 workers, f = 3 Byzantine (sign flipping), batch 25 per worker, trimmed mean, worker momentum 0.9;",
        f"median over {rounds} blocks of 10 steps (the first step of a block not counted) after 2 warm-up steps,",
        "the two libraries' blocks alternating.",
        "Target (issue 16): flagjax / ByzFL <= 1.0 for both models.",
        "",
        "`flagjax`: the default step (on CPU one gradient program per worker for these convolutional models,",
        '`worker_grads="auto"`); `flagjax vmap`: the workers\' gradients as one vmapped program',
        '(`worker_grads="vmap"`, the default before).',
        "",
        "| model | flagjax ms/step | flagjax vmap ms/step | ByzFL ms/step | flagjax / ByzFL | flagjax vmap / ByzFL |",
        "|---|---|---|---|---|---|",
        *[f"| {m} | {a:.1f} | {v:.1f} | {b:.1f} | {a / b:.2f} | {v / b:.2f} |" for m, a, v, b in rows],
        "",
        "Forward + backward of the paper CNN on 250 images (ms):",
        "",
        "| setup | ms |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in pieces.items()],
        "",
    ]
    text = "\n".join(lines)
    _report.save(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
