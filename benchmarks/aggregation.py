"""Aggregation speed: flag (Gram space) vs the mean, numpy's Gram product and a dense released-code path.

Usage:
    python benchmarks/aggregation.py [--quick] [--out benchmarks/results/aggregation.md]

Every number is a median over repeats after a warm-up (``block_until_ready``), and every target is a
ratio between timings taken in the same run (machines are shared and noisy).

* ``numpy G@G.T``: the physical floor of FA on this CPU (p^2 d multiply-adds over one read of the stack).
* ``dense``: what the authors' released code does per IRLS step: an SVD of the d x p matrix of weighted
  unit gradients (and of the d x (p + p(p-1)) matrix with the pairwise columns when lam > 0),
  float32 numpy/LAPACK, for the same number of solves as flag (flag mean + max_iters steps).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import flagjax

ITERS = 5


def timeit(fn, *args, repeats=7, warmup=1):
    """Median wall time (ms) of ``fn(*args)`` after ``warmup`` calls, blocking on the result."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def dense_released(G: np.ndarray, r: int, lam: float, iters: int, eps: float = 1e-6) -> np.ndarray:
    """Dense IRLS as the released code does it: an SVD of a weighted d x m matrix per step."""
    p = G.shape[0]
    X = (G / np.linalg.norm(G, axis=1, keepdims=True)).T  # d x p
    if lam > 0:
        i, j = np.where(~np.eye(p, dtype=bool))
        D = X[:, i] - X[:, j]
        D /= np.linalg.norm(D, axis=0, keepdims=True)
    coef = lam / (p - 1)
    a = np.ones(p, np.float32)
    b = np.full(p * (p - 1), coef, np.float32)
    for step in range(iters + 1):
        M = X * np.sqrt(a)
        if lam > 0:
            M = np.concatenate([M, D * np.sqrt(b)], axis=1)
        Y = np.linalg.svd(M, full_matrices=False)[0][:, :r]
        if step < iters:
            a = 1 / np.sqrt(np.clip(1 - np.sum((Y.T @ X) ** 2, 0), 0, None) + eps)
            if lam > 0:
                b = coef / np.sqrt(np.clip(1 - np.sum((Y.T @ D) ** 2, 0), 0, None) + eps)
    return Y @ (Y.T @ X.sum(1)) / r


def flag_suite(p: int, dims, quick: bool):
    rows = []
    r = flagjax.aggregators.default_rank(p)
    mean = jax.jit(lambda g: flagjax.aggregate("mean", g, f=0))
    flag = jax.jit(
        lambda g, lam: flagjax.aggregate("flag", g, f=0, lam=lam, max_iters=ITERS, tol=-jnp.inf, r=r)
    )
    for d in dims:
        rng = np.random.default_rng(0)
        G = (rng.normal(size=d)[None] + rng.normal(size=(p, d))).astype(np.float32)
        Gj = jnp.asarray(G)
        rep = 3 if quick else 9
        t = {
            "numpy G@G.T": timeit(lambda g: g @ g.T, G, repeats=rep),
            "mean": timeit(mean, Gj, repeats=rep),
            "flag lam=0": timeit(flag, Gj, 0.0, repeats=rep),
            "flag lam=1": timeit(flag, Gj, 1.0, repeats=rep),
            "dense lam=0": timeit(lambda g: dense_released(g, r, 0.0, ITERS), G, repeats=1 if quick else 3),
        }
        if d <= 100_000:  # the d x p^2 SVD at d = 1e6 takes minutes here
            t["dense lam=1"] = timeit(lambda g: dense_released(g, r, 1.0, ITERS), G, repeats=1, warmup=0)
        rows.append((d, t))
    return rows


def render(p, rows, cmd) -> str:
    lines = [
        "# Aggregation benchmark",
        "",
        f"Produced by `{cmd}` on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"JAX {jax.__version__} ({jax.default_backend()}), numpy {np.__version__}; "
        f"p = {p}, r = {flagjax.aggregators.default_rank(p)}, float32, "
        f"{ITERS} IRLS steps after the flag mean (tol disabled), median of repeats.",
        "",
        "## Times (ms)",
        "",
    ]
    names = list(rows[0][1])
    lines.append("| d | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for d, t in rows:
        lines.append(f"| {d:.0e} | " + " | ".join(f"{t[n]:.2f}" if n in t else "—" for n in names) + " |")
    lines += ["", "## Ratios (targets from the foundation issue)", ""]
    lines.append(
        "| d | flag/numpy Gram (≤ 1.5) | flag/mean | flag lam=1 / lam=0 (≤ 1.5) | "
        "dense/flag lam=0 (≥ 50 at 1e6) | dense/flag lam=1 (≥ 100 at 1e5) |"
    )
    lines.append("|---|---|---|---|---|---|")
    for d, t in rows:
        f0, f1 = t["flag lam=0"], t["flag lam=1"]
        dl1 = f"{t['dense lam=1'] / f1:.0f}" if "dense lam=1" in t else "— (d×p² matrix too large)"
        lines.append(
            f"| {d:.0e} | {f0 / t['numpy G@G.T']:.2f} | {f0 / t['mean']:.1f} | {f1 / f0:.2f} | "
            f"{t['dense lam=0'] / f0:.0f} | {dl1} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--p", type=int, default=15)
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args(argv)
    dims = [10_000, 50_000] if args.quick else [100_000, 1_000_000]
    rows = flag_suite(args.p, dims, args.quick)
    cmd = "python benchmarks/aggregation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(args.p, rows, cmd.strip())
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
    return rows


if __name__ == "__main__":
    main()
