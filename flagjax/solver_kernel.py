"""The subspace-iteration flag-median IRLS of :mod:`flagjax.solver` as ONE Pallas kernel (GPU).

On a GPU the p x p loop of :func:`flagjax.solver.solve_gram` is pure latency: every small XLA kernel,
every loop iteration and every cuSOLVER call (Cholesky, triangular solve) costs microseconds of launch
and synchronisation while the arithmetic takes nanoseconds (benchmarks/results/solver_latency_gpu.md:
~10 us per fori_loop iteration of one elementwise op, ~34 us per 8 x 8 Cholesky on an H200). This module
runs the whole loop -- flag-mean start, IRLS steps with their inner subspace iterations, the CholeskyQR2
orthonormalisations (Cholesky and triangular inverse written as masked vector loops) and the final
canonical orthonormalisation -- inside one kernel, one thread block, with K and the basis held in
registers. Same algorithm and the same numbers (to rounding) as ``solve_gram(method="subspace")``
with ``pairwise=False`` (lam = 0, the default); the pairwise term is not in the kernel.

Shapes are padded to powers of two (Triton: P = padded p, R = padded r, both >= 16); padded rows are
invalid points and padded columns dead columns. ``interpret=True`` runs the kernel on the CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["MAX_P", "solve_gram_kernel"]

MAX_P = 64  #: largest p the kernel takes (K and the basis live in one thread block's registers)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _dot(a, b, *, trans_a=False, interpret=False):
    if interpret:  # the CPU interpreter: a plain full-precision dot
        return jnp.dot(a.T if trans_a else a, b, precision=lax.Precision.HIGHEST)
    return plt.dot(a, b, trans_a=trans_a, allow_tf32=False)


def _kernel(
    k_ref,
    v_ref,
    c_ref,
    prm_ref,
    c_out,
    ratio_out,
    w_out,
    trace_out,
    stat_out,
    *,
    R,
    T,
    r,
    max_iters,
    inner_iters,
    start_iters,
    shift,
    tiny,
    interpret,
):
    dot = functools.partial(_dot, interpret=interpret)
    K = k_ref[...]
    valid = v_ref[...] > 0.5
    C = c_ref[...]
    prm = prm_ref[...]
    dtype = K.dtype
    iota16 = lax.broadcasted_iota(jnp.int32, prm.shape, 0)
    eps = jnp.sum(jnp.where(iota16 == 0, prm, 0))
    tol = jnp.sum(jnp.where(iota16 == 1, prm, 0))
    ir = lax.broadcasted_iota(jnp.int32, (R,), 0)
    rows = lax.broadcasted_iota(jnp.int32, (R, R), 0)
    cols = lax.broadcasted_iota(jnp.int32, (R, R), 1)
    eye = (rows == cols).astype(dtype)
    real_col = ir < r

    def diag(A):
        return jnp.sum(A * eye, axis=1)

    def cholesky(A):
        """Lower Cholesky factor of the R x R SPD tile A (NaN where A is not positive definite)."""

        def col(j, carry):
            A, L = carry
            ej = ir == j
            ajj = jnp.sum(jnp.where((rows == j) & (cols == j), A, 0))
            c = jnp.sum(jnp.where(cols == j, A, 0), axis=1) / jnp.sqrt(ajj)
            c = jnp.where(ir >= j, c, 0)
            L = jnp.where(ej[None, :], c[:, None], L)
            return A - c[:, None] * c[None, :], L

        return lax.fori_loop(0, R, col, (A, jnp.zeros_like(A)))[1]

    def tri_inverse(L):
        """L^-1 of a lower-triangular R x R tile, row by row (forward substitution)."""

        def row(i, X):
            li = jnp.sum(jnp.where(rows == i, L, 0), axis=0)  # row i of L
            lii = jnp.sum(jnp.where(ir == i, li, 0))
            acc = jnp.sum(jnp.where(ir < i, li, 0)[:, None] * X, axis=0)  # sum_{k<i} L_ik X_k
            xi = (jnp.where(ir == i, 1.0, 0.0).astype(dtype) - acc) / lii
            return jnp.where((rows == i), xi[None, :], X)

        return lax.fori_loop(0, R, row, jnp.zeros_like(L))

    def chol_pass(C, KC, sh, drop):
        G = dot(C, KC, trans_a=True)
        g = diag(G)
        live = (g > tiny * 16) & real_col
        s = jnp.where(live, lax.rsqrt(jnp.where(live, g, 1)), 0)
        Gs = G * s[:, None] * s[None, :]
        Gs = jnp.where(live[:, None] & live[None, :], (Gs + Gs.T) / 2, 0)
        Gs = Gs + eye * jnp.where(live, sh, 1)[:, None]
        L = cholesky(Gs)
        ok = jnp.sum(jnp.where(jnp.isfinite(L), 0.0, 1.0)) == 0
        if drop is not None:
            live = live & (diag(L) ** 2 > drop)
        Z = jnp.where(live[None, :], s[:, None] * tri_inverse(L).T, 0)
        return dot(C, Z), dot(KC, Z), ok

    def cholqr2(C, KC):
        C1, KC1, _ = chol_pass(C, KC, shift, None)
        C2, KC2, ok = chol_pass(C1, KC1, 4 * float(jnp.finfo(dtype).eps), 0.01)
        return jnp.where(ok, C2, C1), jnp.where(ok, KC2, KC1)

    def iterate(a, C, KC, n):
        def it(_, ck):
            C, KC = ck
            WV = a[:, None] * KC
            return cholqr2(WV, dot(K, WV))

        return lax.fori_loop(0, n, it, (C, KC))

    def evaluate(KC):
        n2 = jnp.sum(KC * KC, axis=1)
        ratios = jnp.where(valid, jnp.clip(n2, 0, 1), 0)
        s = jnp.where(valid, 1 - ratios, 0)
        a = jnp.where(valid, lax.rsqrt(s + eps), 0)
        return jnp.sum(jnp.sqrt(s)), ratios, a

    a0 = valid.astype(dtype)
    C, KC = cholqr2(C, dot(K, C))
    C, KC = iterate(a0, C, KC, start_iters)
    obj, ratios, na = evaluate(KC)
    it_t = lax.broadcasted_iota(jnp.int32, (T,), 0)
    trace = jnp.where(it_t == 0, obj, jnp.nan).astype(dtype)

    def step(t, st):
        C, KC, w, obj, ratios, na, steps, trace, conv = st
        C2, KC2 = iterate(na, C, KC, inner_iters)
        obj2, ratios2, na2 = evaluate(KC2)
        dec = (obj - obj2) / jnp.maximum(jnp.abs(obj), tiny)
        new = (C2, KC2, na, obj2, ratios2, na2, steps + 1, jnp.where(it_t == steps + 1, obj2, trace), dec < tol)
        return tuple(jnp.where(conv, o, n) for o, n in zip(st, new, strict=True))

    st = (C, KC, a0, obj, ratios, na, jnp.int32(0), trace, jnp.bool_(False))
    C, KC, w, obj, ratios, _, steps, trace, conv = lax.fori_loop(0, max_iters, step, st)

    # canonical basis (solver._reorthonormalise): Gram-Schmidt in the K metric, zero columns past the rank,
    # each column's sign fixed so that it has a non-negative inner product with sum_i x_i
    KC = dot(K, C)
    Gm = dot(C, KC, trans_a=True)
    Gm = (Gm + Gm.T) / 2
    zero = diag(Gm) < 0.5
    Gm = jnp.where(zero[:, None] | zero[None, :], 0, Gm) + eye * zero.astype(dtype)[:, None]
    Z = jnp.where(zero[None, :], 0, tri_inverse(cholesky(Gm)).T)
    C = dot(C, Z)
    side = jnp.sum(dot(K, C), axis=0)
    C = C * jnp.where(side < 0, -1.0, 1.0).astype(dtype)[None, :]

    c_out[...] = C
    ratio_out[...] = ratios
    w_out[...] = w
    trace_out[...] = trace
    stat = jnp.where(iota16 == 0, obj, 0) + jnp.where(iota16 == 1, steps.astype(dtype), 0)
    stat_out[...] = stat + jnp.where(iota16 == 2, conv.astype(dtype), 0)


def solve_gram_kernel(
    K,
    valid,
    C0,
    eps,
    tol,
    *,
    r: int,
    max_iters: int,
    inner_iters: int,
    start_iters: int,
    shift: float,
    interpret: bool = False,
):
    """:func:`flagjax.solver.solve_gram` (subspace method, lam = 0) as one Pallas kernel.

    Args:
      K: (p, p) unit Gram matrix, float32 (float64 only with ``interpret``), p <= :data:`MAX_P`.
      valid: (p,) bool. C0: (p, r) start block (``solver._start_block``).
      eps, tol: scalars (traced). r, max_iters, inner_iters, start_iters: static, as in ``solve_gram``.
      shift: static relative diagonal shift of the first CholeskyQR pass (as ``solve_gram``'s).
      interpret: run the kernel with the Pallas interpreter (CPU tests) instead of compiling it.

    Returns:
      (C, ratios, weights, objective, trace, num_steps, converged), as ``solve_gram``; C is already in
      the canonical orthonormal form.
    """
    p = K.shape[0]
    if p > MAX_P:
        raise ValueError(f"the Pallas solver takes p <= {MAX_P} points; got p = {p}")
    dtype = K.dtype
    P, R, T = _pow2(p), _pow2(r), _pow2(max_iters + 1)
    Kp = jnp.zeros((P, P), dtype).at[:p, :p].set(K)
    vp = jnp.zeros((P,), dtype).at[:p].set(valid.astype(dtype))
    Cp = jnp.zeros((P, R), dtype).at[:p, :r].set(C0)
    prm = jnp.zeros((16,), dtype).at[0].set(eps).at[1].set(tol)
    kernel = functools.partial(
        _kernel,
        R=R,
        T=T,
        r=r,
        max_iters=max_iters,
        inner_iters=inner_iters,
        start_iters=start_iters,
        shift=shift,
        tiny=float(jnp.finfo(dtype).tiny),
        interpret=interpret,
    )
    out_shape = (
        jax.ShapeDtypeStruct((P, R), dtype),
        jax.ShapeDtypeStruct((P,), dtype),
        jax.ShapeDtypeStruct((P,), dtype),
        jax.ShapeDtypeStruct((T,), dtype),
        jax.ShapeDtypeStruct((16,), dtype),
    )
    params = None if interpret else plt.CompilerParams(num_warps=4, num_stages=1)
    C, ratios, w, trace, stat = pl.pallas_call(
        kernel, out_shape=out_shape, interpret=interpret, compiler_params=params, name="flag_irls"
    )(Kp, vp, Cp, prm)
    steps = stat[1].astype(jnp.int32)
    return C[:p, :r], ratios[:p], w[:p], stat[0], trace[: max_iters + 1], steps, stat[2] > 0.5
