"""One training step for one run against a batch of runs in one program, in process (no compilation).

Usage:
    python benchmarks/batch_step.py [--runs 2] [--steps 10] [--out benchmarks/results/batch_step.md]

Paper CNN, p = 15 workers (f = 3 random), batch 32 per worker, FA, synthetic 28 x 28 images, one
device. Setups: one run; ``--runs`` runs vmapped (``runs_vectorized=0``); the same runs one after the
other inside the program (``runs_vectorized=1``, ``lax.map``). Each is compiled and warmed for two
steps, then timed round-robin (one step of each in turn, each blocked on), median over ``--steps``.
The ratio that matters: batch step / (runs x single step) — below 1 a batch saves compute time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import _report  # benchmarks/_report.py (the script's folder is on sys.path)
import jax
from _timing import time_interleaved  # benchmarks/_timing.py

from flagjax import data, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ds = data.synthetic_dataset(n_train=6000, n_test=500)
    base = dict(model="cnn", num_workers=15, num_byzantine=3, attack="random", rule="flag", batch_size=32)
    base.update(steps=10, out_dir="/tmp/flagjax-batch-step", num_devices=1)
    seeds = train.Values(range(args.runs))
    setups = {
        "one run": train.setup(train.TrainConfig(**base), ds),
        f"{args.runs} runs vmapped": train.setup(train.TrainConfig(**base, seed=seeds), ds),
        f"{args.runs} runs one after the other (lax.map)": train.setup(
            train.TrainConfig(**base, seed=seeds, runs_vectorized=1), ds
        ),
    }
    ms = time_interleaved(setups, args.steps)
    one = ms["one run"]
    cmd = " ".join(["python benchmarks/batch_step.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# One training step: one run vs a batch of runs in one program",
        "",
        f"Produced by `{cmd}` on {platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} "
        f"({jax.default_backend()}, {jax.devices()[0].device_kind}); paper CNN, p = 15, batch 32, FA; median of "
        f"{args.steps} steps after 2 warm-up steps, timed round-robin.",
        "",
        "| setup | step (ms) | / (runs x one run) |",
        "|---|---|---|",
    ]
    for k, v in ms.items():
        runs = 1 if k == "one run" else args.runs
        lines.append(f"| {k} | {v:.0f} | {v / (runs * one):.2f} |")
    text = "\n".join(lines) + "\n"
    _report.save(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
