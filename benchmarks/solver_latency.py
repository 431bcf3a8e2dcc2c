"""Where the p x p solver's time goes on an accelerator: per-iteration latency of its building blocks.

Usage:
    python benchmarks/solver_latency.py [--out FILE.md]

Each row jits a fixed-trip-count loop (``lax.fori_loop``, 64 iterations) of one building block of
:func:`flagjax.solver.solve_gram` at p = 15, r = 8 (float32) and reports microseconds per iteration
(median of repeats, after a warm-up), next to whole solves. A block that costs far more than its
arithmetic is launch- or call-latency; comparing rows says whether the loop's cost is its library calls
(cuSOLVER Cholesky / triangular solve, LAPACK on CPU) or its many small kernels, which decides the next
step of the solver (a matmul-only loop that CUDA graphs can capture, or one Pallas kernel).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import _report  # benchmarks/_report.py
import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_seconds  # benchmarks/_timing.py
from jax import lax

from flagjax import solver

N = 64


def _time(fn, *args, repeats=21):
    return 1e6 * median_seconds(fn, *args, repeats=repeats)


def _eigh_body(x, K):
    U = jnp.linalg.eigh(x)[1]
    return U @ jnp.diag(jnp.arange(x.shape[0], dtype=x.dtype)) @ U.T + K


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    p, r, d = 15, 8, 10_000
    rng = np.random.default_rng(0)
    G = jnp.asarray((rng.normal(size=d)[None] + rng.normal(size=(p, d))).astype(np.float32))
    info = solver.prepare_gram(G)
    K, valid = info.K, info.valid
    C = jnp.asarray(rng.normal(size=(p, r)), jnp.float32)
    S = jnp.eye(r, dtype=jnp.float32) * 2 + 0.1
    hi = lax.Precision.HIGHEST
    geo = solver._geometry(K, valid)

    def loop(body, x):
        return jax.jit(lambda x: lax.fori_loop(0, N, lambda i, x: body(x), x))

    blocks = {
        "elementwise (p x r)": (lambda x: jnp.tanh(x) * 1.0001, C),
        "dot (p x p) @ (p x r)": (lambda x: jnp.dot(K, x, precision=hi) * 0.1, C),
        "dot (r x p) @ (p x r)": (
            lambda x: x + 1e-3 * jnp.dot(C.T, jnp.dot(K, C, precision=hi), precision=hi)[0, 0],
            C,
        ),
        "cholesky (r x r)": (lambda x: jnp.linalg.cholesky(x) @ jnp.linalg.cholesky(x).T * 0.5 + jnp.eye(r), S),
        "triangular solve (r x r, 2p rhs)": (
            lambda x: jax.scipy.linalg.solve_triangular(jnp.tril(S) + 3 * jnp.eye(r), x, lower=True),
            jnp.concatenate([C, C]).T,
        ),
        "eigh (p x p)": (lambda x: _eigh_body(x, K), K),
        "subspace step (CholeskyQR2)": (
            lambda c: solver._subspace_step(geo, valid.astype(K.dtype), None, c[0], c[1], shift=1e-4)[:2],
            (C, K @ C),
        ),
    }
    rows = []
    for name, (body, x) in blocks.items():
        rows.append((name, _time(loop(body, x), x) / N))
        print(rows[-1], flush=True)
    whole = {}
    for label, kw in {
        "solve_gram subspace (default: 8 + 10 x 2 iterations)": {},
        "solve_gram subspace, max_iters=0 (start only)": {"max_iters": 0},
        "solve_gram subspace, max_iters=0, start_iters=1 (the fixed part)": {"max_iters": 0, "start_iters": 1},
        # a warm start from the previous round's basis (issue #15) could at best drop the flag-mean
        # start's iterations: this row bounds its gain
        "solve_gram subspace, start_iters=1 (a warm start's best case)": {"start_iters": 1},
        "solve_gram subspace, inner_iters=1 (1 iteration per IRLS step)": {"inner_iters": 1},
        "solve_gram eigh (11 eigh)": {"method": "eigh"},
        "solve_gram pallas (the default's loop as one kernel)": {"method": "pallas"},
    }.items():
        fn = jax.jit(lambda K, v, kw=kw: solver.solve_gram(K, v, r=r, pairwise=False, **kw))
        try:
            whole[label] = _time(lambda K, v: fn(K, v)[0], K, valid)
        except Exception as err:  # a kernel that does not lower here: say so, keep the other rows
            whole[label] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        print(label, whole[label], flush=True)
    # the kernel against the XLA loop it replaces, on this device
    agree = ""
    if isinstance(whole.get("solve_gram pallas (the default's loop as one kernel)"), float):
        a = jax.jit(lambda K, v: solver.solve_gram(K, v, r=r, pairwise=False))(K, valid)
        b = jax.jit(lambda K, v: solver.solve_gram(K, v, r=r, pairwise=False, method="pallas"))(K, valid)
        X = np.asarray(solver.unit_rows(G), np.float64)
        Ya, Yb = X.T @ np.asarray(a[0], np.float64), X.T @ np.asarray(b[0], np.float64)
        pd = np.linalg.norm(Ya @ Ya.T - Yb @ Yb.T)
        rel = abs(float(a[3]) - float(b[3])) / abs(float(a[3]))
        agree = f"pallas vs XLA loop on this device: projector distance {pd:.2e}, objective rel. diff {rel:.2e}"
        print(agree, flush=True)
    lines = [
        "# Solver latency",
        "",
        f"Produced by `python benchmarks/solver_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} ({jax.default_backend()}: "
        f"{jax.devices()[0].device_kind}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; p = {p}, r = {r}, float32.",
        "",
        f"| building block, in a {N}-iteration fori_loop | us / iteration |",
        "|---|---|",
    ]
    lines += [f"| {n} | {v:.1f} |" for n, v in rows]
    lines += ["", "| whole solve (jitted, one call) | us |", "|---|---|"]
    lines += [f"| {n} | {v:.0f} |" if isinstance(v, float) else f"| {n} | {v} |" for n, v in whole.items()]
    if agree:
        lines += ["", agree]
    text = "\n".join(lines) + "\n"
    print(text)
    _report.save(text, args.out)


if __name__ == "__main__":
    main()
