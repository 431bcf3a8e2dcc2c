"""Cost of calling the solver outside ``jit`` (a notebook, a test): compiled entry vs op-by-op dispatch.

Usage:
    python benchmarks/eager_calls.py [--out benchmarks/results/eager_calls.md]

``flagjax.flag_median`` compiles itself (one program per shape, dtype, ``r`` and ``max_iters``). This
times, for stacks of shapes the process has not seen before, its first call (compile + run) and a
repeat call, against the same calls under ``jax.disable_jit()`` (op-by-op dispatch, the IRLS loop as a
Python loop). Each shape is used by one path only, so neither path profits from the other's caches.
Every figure is a median over the shapes, and the ratios are between timings of this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import _report  # benchmarks/_report.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

import flagjax


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def first_and_repeat(p: int, d: int, *, op_by_op: bool) -> tuple[float, float]:
    g = jnp.asarray(np.random.default_rng(p * 1000 + d).normal(size=(p, d)), jnp.float32)
    r = (p + 2) // 2

    def call():
        if op_by_op:
            with jax.disable_jit():
                return flagjax.flag_median(g, r, max_iters=10)
        return flagjax.flag_median(g, r, max_iters=10)

    return _time(call), _time(call)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    flagjax.flag_median(jnp.ones((3, 4)), 2)  # import-time and first-dispatch costs out of the way
    shapes = {"jit": [(7, 50), (9, 61), (11, 73)], "op": [(8, 50), (10, 61), (12, 73)]}
    res = {k: [first_and_repeat(p, d, op_by_op=k == "op") for p, d in v] for k, v in shapes.items()}
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in res.items()}
    (jf, jr), (of, orep) = med["jit"], med["op"]
    text = "\n".join(
        [
            "# Eager calls of flag_median: compiled entry vs op-by-op",
            "",
            f"Produced by `python benchmarks/eager_calls.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" on {platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__}"
            f" ({jax.default_backend()}); float32, max_iters = 10, r = ceil((p + 1) / 2); median over 3 new"
            " shapes per path (p = 7..12, d = 50..73).",
            "",
            "| path | first call on a new shape (s) | repeat call (ms) |",
            "|---|---|---|",
            f"| flag_median (compiles itself) | {jf:.2f} | {1e3 * jr:.2f} |",
            f"| op-by-op (`jax.disable_jit()`) | {of:.2f} | {1e3 * orep:.2f} |",
            f"| op-by-op / compiled | {of / jf:.1f}x | {orep / jr:.0f}x |",
            "",
        ]
    )
    _report.save(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
