"""Training-step cost: flag vs mean, sharded vs server, and per-device collective traffic.

Usage:
    python benchmarks/train_step.py [--quick] [--out benchmarks/results/train_step.md]

Runs with 8 simulated CPU devices (set before JAX starts). Every figure is a ratio of timings taken in
this run (median over steps after two warm-up steps, each step blocked on; the setups compared in
one table are timed round-robin, one step of each in turn, so drift and warm-up favour none of them).

* step time with ``flag`` (default solver, and ``method="eigh"``) / with ``mean``: paper CNN, p = 15,
  batch 64 per worker, 1 device; ResNet-18 on CIFAR shapes with ``--resnet`` (default on GPU/TPU);
* sharded / server step time on 8 devices (p = 8, 16, 32 workers, paper CNN, batch 16);
* bytes each device sends per step, read from the compiled program's collectives (HLO): a ring
  all-gather or all-to-all sends (n-1)/n of its result, an all-reduce 2(n-1)/n of its operand, a
  reduce-scatter (n-1)/n of its operand. The sharded layout sends ~(p/n + 1) D (n-1)/n per device:
  its own workers' rows out and the aggregate back, so per worker-hosting device it does not grow
  with p (with one worker per device: ~2 D); the server layout's all-gather grows with p.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import _report  # noqa: E402  # benchmarks/_report.py (the script's folder is on sys.path)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _timing import time_interleaved  # noqa: E402  # benchmarks/_timing.py

from flagjax import data, train  # noqa: E402

_DT = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_COLL = re.compile(r"^\s*\S+\s*=\s*(.*?)\s(all-gather|all-to-all|all-reduce|reduce-scatter)(?:-start)?\(", re.M)


def _bytes(shape_text: str) -> int:
    total = 0
    for dt, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", shape_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _DT.get(dt, 4)
    return total


def collective_bytes(hlo: str, n: int) -> dict[str, float]:
    """Per-device bytes sent per step by collective kind, from compiled HLO text (ring model)."""
    out: dict[str, float] = {}
    for shape, kind in _COLL.findall(hlo):
        b = _bytes(shape)
        factor = 2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n
        if kind == "reduce-scatter":
            b *= n  # result is the scattered part; the operand is n times larger
        out[kind] = out.get(kind, 0.0) + factor * b
    return out


def synthetic(n=4000, seed=0, shape=(28, 28, 1)):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return data.Dataset("synthetic", x, y, x[:500], y[:500], 10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--resnet",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time ResNet-18 on CIFAR shapes (auto: on GPU/TPU only; a CPU step takes tens of seconds)",
    )
    args = ap.parse_args(argv)
    steps = 5 if args.quick else 20
    ds = synthetic()
    tmp = tempfile.mkdtemp()
    base = dict(model="cnn", attack="random", steps=10, out_dir=tmp, num_byzantine=3)

    lines = [
        "# Training-step benchmark",
        "",
        f"Produced by `python benchmarks/train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" on {platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} ({jax.default_backend()},"
        f" {jax.device_count()} x {jax.devices()[0].device_kind}); median of {steps} steps after 2 warm-up"
        " steps, timed round-robin.",
        "",
        "## flag vs mean (paper CNN, p = 15, f = 3 random, batch 64 per worker, 1 device)",
        "",
        "| rule | step (ms) | / mean |",
        "|---|---|---|",
    ]
    rules = {
        "mean": {},
        "flag": {},
        "flag warm_start=2": {"warm_start": 2},  # the previous step's basis as the start (issue #15)
        "flag eigh": {"method": "eigh"},
        "multi_krum": {},
        "median": {},
    }
    if jax.default_backend() == "gpu":  # the one-kernel solver (interpreted on CPU: for tests, not timing)
        rules["flag pallas"] = {"method": "pallas"}

    def cfg_of(label, hp, **kw):
        return train.TrainConfig(
            **{**base, **kw}, rule=label.split()[0], rule_hparams=hp, num_workers=15, num_devices=1
        )

    cfgs = {k: cfg_of(k, hp, batch_size=64) for k, hp in rules.items()}
    t = time_interleaved({r: train.setup(c, ds) for r, c in cfgs.items()}, steps)
    for rule, v in t.items():
        lines.append(f"| {rule} | {v:.1f} | {v / t['mean']:.2f} |")
    print("\n".join(lines), flush=True)

    resnet = args.resnet == "on" or (args.resnet == "auto" and jax.default_backend() != "cpu")
    if resnet:
        lines += [
            "",
            "## flag vs mean (ResNet-18, CIFAR shapes 32 x 32 x 3, synthetic data, p = 15, f = 3 random, "
            "batch 32 per worker, 1 device)",
            "",
            "| rule | step (ms) | / mean |",
            "|---|---|---|",
        ]
        cifar = synthetic(2000, shape=(32, 32, 3))
        shown = [k for k in rules if k in ("mean", "flag", "flag warm_start=2", "flag eigh", "flag pallas")]
        cfgs = {k: cfg_of(k, rules[k], batch_size=32, model="resnet18") for k in shown}
        try:
            t = time_interleaved({r: train.setup(c, cifar) for r, c in cfgs.items()}, steps)
        except Exception as err:  # keep the other sections' numbers (a device run is not repeated lightly)
            lines.append(f"| failed: {type(err).__name__}: {str(err).splitlines()[0][:200]} | | |")
            t = {}
        for rule, v in t.items():
            lines.append(f"| {rule} | {v:.1f} | {v / t['mean']:.2f} |")
        print("\n".join(lines[-len(t) - 2 :]), flush=True)

    lines += [
        "",
        "## sharded vs server layout (paper CNN, 8 devices, batch 16 per worker, f = 2, ALIE)",
        "",
        "Bytes: per device per step, from the compiled HLO's collectives (ring model, see docstring).",
        "",
        "| p | rule | server (ms) | sharded (ms) | sharded / server | server bytes/device | sharded bytes/device "
        "| sharded bytes / (p/n + 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ps = [8, 16] if args.quick else [8, 16, 32]
    if jax.device_count() < 8:  # e.g. one GPU: XLA_FLAGS only multiplies CPU devices
        lines.append(f"| skipped: this section needs 8 devices, this run has {jax.device_count()} | | | | | | | |")
        ps = []
    for p in ps:
        for rule in ("flag", "median"):
            sus, hlo_bytes = {}, {}
            for layout in ("server", "sharded"):
                cfg = train.TrainConfig(
                    model="cnn",
                    attack="alie",
                    steps=10,
                    out_dir=tmp,
                    rule=rule,
                    num_workers=p,
                    num_byzantine=2,
                    batch_size=16,
                    num_devices=8,
                    layout=layout,
                )
                su = sus[layout] = train.setup(cfg, ds)
                x, y = su.batch(0)
                hlo = su.step_fn.lower(su.state, x, y, su.hparams).compile().as_text()
                hlo_bytes[layout] = sum(collective_bytes(hlo, 8).values())
            ms = time_interleaved(sus, steps)
            ts, th = ms["server"], ms["sharded"]
            bs, bh = hlo_bytes["server"], hlo_bytes["sharded"]
            lines.append(
                f"| {p} | {rule} | {ts:.1f} | {th:.1f} | {th / ts:.2f} | {bs / 1e6:.2f} MB | {bh / 1e6:.2f} MB "
                f"| {bh / (p / 8 + 1) / 1e6:.3f} MB |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    _report.save(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
