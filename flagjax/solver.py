"""The Flag Aggregator's flag-median solver, in Gram space.

Paper: Almasi, Mishra, Vamanan, Ravi, "Flag Aggregator: Scalable Distributed Training under Failures
and Augmented Losses using Convex Optimization", ICLR 2024 (arXiv 2302.05865), Sections 3-4.

Given p worker gradients g_i (rows of ``points``), with unit directions x_i = g_i / ||g_i||, the
flag median is the r-dimensional subspace span(Y), Y^T Y = I, minimising (paper eq. 5)

    A(Y) = sum_i sqrt(1 - ||Y^T x_i||^2) + lam/(p-1) * sum_{i != j} sqrt(1 - ||Y^T dhat_ij||^2),

with dhat_ij = (x_i - x_j) / ||x_i - x_j||. The pairwise term is built on the *unit* directions (as
the authors' released code feeds it), not on raw gradients; pairs with x_i = x_j contribute nothing.

IRLS (paper Algorithm 1): with weights a_i = (1 - ||Y_t^T x_i||^2 + eps)^(-1/2) and
b_ij = lam/(p-1) * (1 - ||Y_t^T dhat_ij||^2 + eps)^(-1/2), Y_{t+1} is the top-r eigenvectors of
M_t = sum_i a_i x_i x_i^T + sum_{i!=j} b_ij dhat_ij dhat_ij^T. Each step is a majorise-minimise
step, so A is non-increasing along the iterates (up to eps).

Everything depends on X only through the p x p Gram matrix K = X^T X: M_t = X W_t X^T with
W_t = diag(a) + Laplacian(2 b_ij / ||d_ij||^2) (p x p, PSD). With W = F F^T and the top-r
eigenpairs (mu, U) of S = F^T K F, Y = X C with C = F U diag(mu^-1/2) (p x r). One O(d p^2) Gram
product, then every IRLS step costs O(p^3), independent of d (docs/design.md section 1.1).
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flagjax import native, solver_kernel

__all__ = [
    "FlagSolution",
    "FlagStatus",
    "GramInfo",
    "flag_median",
    "gram_matrix",
    "prepare_gram",
    "gram_info_from_raw",
    "solve_gram",
    "warm_start_block",
    "combine_rows",
    "unit_rows",
    "objective",
    "status_code",
    "solver_options",
    "METHODS",
    "INNER_ITERS",
    "START_ITERS",
]

# Column block used by the CPU Gram product. XLA's CPU dot for a (p, 1e6) x (1e6, p) product is
# ~2x slower than numpy; a scan over (p, 4096) blocks is ~2x *faster* than numpy (measured in
# benchmarks/aggregation.py). On GPU/TPU a single dot is used.
_CPU_GRAM_BLOCK = 4096


class FlagStatus(enum.IntEnum):
    """How :func:`flag_median` stopped (the ``status`` field of :class:`FlagSolution`)."""

    CONVERGED = 0  #: relative objective decrease fell below ``tol``.
    MAX_STEPS = 1  #: ``max_iters`` IRLS steps were taken without meeting ``tol`` (or max_iters=0).
    NONFINITE_INPUT = 2  #: some rows were non-finite or zero; they got weight 0 (see ``valid``).


class FlagSolution(NamedTuple):
    """Result of :func:`flag_median` (p workers, dimension d, subspace rank r).

    Attributes:
      basis: (d, r) float, orthonormal columns spanning the flag median. Columns beyond the rank of
        the valid points are exactly zero.
      coeffs: (p, r) float, ``basis = unit_rows(points).T @ coeffs``.
      ratios: (p,) float in [0, 1], reconstruction ratios ||basis^T x_i||^2 (0 for invalid rows).
      weights: (p,) float, IRLS weights a_i that produced ``basis`` (1 at the flag mean, 0 for invalid).
      objective: () float, A(basis) including the pairwise term when lam > 0.
      trace: (max_iters + 1,) float, objective after 0 (flag mean), 1, ... IRLS steps; NaN after stop.
      num_steps: () int32, IRLS steps taken.
      status: () int32, a :class:`FlagStatus` code.
      valid: (p,) bool, rows that were finite and non-zero (the others were ignored).
    """

    basis: jax.Array
    coeffs: jax.Array
    ratios: jax.Array
    weights: jax.Array
    objective: jax.Array
    trace: jax.Array
    num_steps: jax.Array
    status: jax.Array
    valid: jax.Array


class GramInfo(NamedTuple):
    """Gram-space summary of a (p, d) stack, computed in one pass over it (:func:`prepare_gram`).

    Attributes:
      K: (p, p) Gram matrix of the unit rows x_i (zero rows/columns for invalid rows).
      norms: (p,) ||g_i|| (0 for invalid rows; may be +inf for finite rows whose norm overflows).
      valid: (p,) bool, finite and non-zero rows.
      scale: (p,) per-row prescale used to form K (1 unless the stack held non-finite, zero or
        overflowing rows); ``combine_rows`` needs it.
      work_norms: (p,) norms of the prescaled rows ``points / scale`` (1 for invalid rows).
      safe: () bool, whether the prescaled (slow, second-pass) path was taken.
    """

    K: jax.Array
    norms: jax.Array
    valid: jax.Array
    scale: jax.Array
    work_norms: jax.Array
    safe: jax.Array


def _work_dtype(dtype) -> jnp.dtype:
    """float32 for half/bfloat16 inputs, else the input float dtype."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def _gram_dense(points: jax.Array) -> jax.Array:
    return jnp.dot(points, points.T, precision=lax.Precision.HIGHEST)


def _gram_blocked(points: jax.Array) -> jax.Array:
    p, d = points.shape
    nb, rem = divmod(d, _CPU_GRAM_BLOCK)
    if nb < 2:
        return _gram_dense(points)

    def body(acc, i):
        blk = lax.dynamic_slice_in_dim(points, i * _CPU_GRAM_BLOCK, _CPU_GRAM_BLOCK, axis=1)
        return acc + _gram_dense(blk), None

    acc, _ = lax.scan(body, jnp.zeros((p, p), points.dtype), jnp.arange(nb))
    if rem:
        acc = acc + _gram_dense(points[:, nb * _CPU_GRAM_BLOCK :])
    return acc


def gram_matrix(points: jax.Array) -> jax.Array:
    """Gram matrix ``points @ points.T`` at full precision.

    Args:
      points: (p, d) float array.

    Returns:
      (p, p) array of inner products, same dtype. On CPU it is accumulated over column blocks (a
      memory-bound single pass that XLA:CPU runs ~4x faster than one large dot); elsewhere it is a
      single ``precision=HIGHEST`` dot.
    """
    return lax.platform_dependent(points, cpu=_gram_blocked, default=_gram_dense)


def prepare_gram(points: jax.Array) -> GramInfo:
    """Unit-direction Gram matrix, norms and validity of a (p, d) stack (docs/design.md section 1.1).

    Fast path: one Gram product of the raw rows, K_ij = <g_i, g_j> / (||g_i|| ||g_j||). If any
    diagonal entry is non-finite or not a normal positive number (NaN/Inf rows, zero rows,
    denormals, norms that overflow), a second pass prescales every row by its max-abs value and
    zeroes non-finite rows before the Gram product, so no NaN/Inf reaches K.

    Args:
      points: (p, d) float array (float32/float64; bfloat16/float16 are promoted to float32).

    Returns:
      A :class:`GramInfo`.
    """
    points = jnp.asarray(points, _work_dtype(points.dtype))
    dtype = points.dtype
    p = points.shape[0]
    raw = gram_matrix(points)
    diag = jnp.diagonal(raw)
    finfo = jnp.finfo(dtype)
    fast_ok = jnp.all(jnp.isfinite(diag) & (diag >= finfo.tiny) & (diag <= finfo.max / 4))

    def fast(_):
        scale = jnp.ones((p,), dtype)
        return raw, scale, jnp.ones((p,), bool)

    def safe(_):
        row_finite = jnp.all(jnp.isfinite(points), axis=1)
        mx = jnp.max(jnp.abs(jnp.where(row_finite[:, None], points, 0)), axis=1)
        ok = row_finite & (mx > 0)
        scale = jnp.where(ok, mx, 1).astype(dtype)
        z = jnp.where(ok[:, None], points / scale[:, None], 0)
        return gram_matrix(z), scale, ok

    kw, scale, ok = lax.cond(fast_ok, fast, safe, None)
    return gram_info_from_raw(kw, scale=scale, ok=ok, safe=~fast_ok)


def gram_info_from_raw(raw: jax.Array, *, scale=None, ok=None, safe=None) -> GramInfo:
    """:class:`GramInfo` from a raw Gram matrix ``raw`` (p, p) = Z Z^T of (prescaled) rows Z.

    Used by :func:`prepare_gram` and by the sharded layout, where ``raw`` is the psum of per-device
    partial Gram matrices. Rows with a non-finite or non-positive squared norm are invalid.

    Args:
      raw: (p, p) Gram matrix of the rows that will be combined (``points / scale``).
      scale: (p,) prescale of the rows (default ones). ok: (p,) rows known to be finite (default all).
      safe: () bool recorded in the result (default False).
    """
    p = raw.shape[0]
    dtype = raw.dtype
    scale = jnp.ones((p,), dtype) if scale is None else scale
    ok = jnp.ones((p,), bool) if ok is None else ok
    safe = jnp.array(False) if safe is None else safe
    kw = raw
    wdiag = jnp.diagonal(kw)
    valid = ok & (wdiag > 0) & jnp.isfinite(wdiag)
    work_norms = jnp.where(valid, jnp.sqrt(jnp.where(valid, wdiag, 1)), 1)
    kw = jnp.where(valid[:, None] & valid[None, :], kw, 0)
    K = kw / (work_norms[:, None] * work_norms[None, :])
    K = jnp.clip(K, -1, 1)
    K = K.at[jnp.diag_indices(p)].set(valid.astype(dtype))
    norms = jnp.where(valid, scale * work_norms, 0)
    return GramInfo(K, norms, valid, scale, work_norms, safe)


def combine_rows(points: jax.Array, q: jax.Array, info: GramInfo) -> jax.Array:
    """Linear combination of the unit rows: returns sum_i q_i x_i = X q, shape (d,).

    One pass over ``points``; invalid rows are skipped (their q_i is ignored), so NaN/Inf rows never
    reach the output.

    Args:
      points: (p, d) the stack given to :func:`prepare_gram`.
      q: (p,) coefficients on the unit directions x_i.
      info: the :class:`GramInfo` of ``points``.
    """
    points = jnp.asarray(points, info.K.dtype)
    c = jnp.where(info.valid, q / info.work_norms, 0).astype(points.dtype)

    def fast(pts):
        return jnp.dot(c, pts, precision=lax.Precision.HIGHEST)

    def safe(pts):
        z = jnp.where(info.valid[:, None], pts / info.scale[:, None], 0)
        return jnp.dot(c, z, precision=lax.Precision.HIGHEST)

    return lax.cond(info.safe, safe, fast, points)


def unit_rows(points: jax.Array) -> jax.Array:
    """Rows divided by their norms; non-finite or zero rows become 0. (p, d) -> (p, d)."""
    points = jnp.asarray(points, _work_dtype(points.dtype))
    finite = jnp.all(jnp.isfinite(points), axis=1, keepdims=True)
    mx = jnp.max(jnp.abs(jnp.where(finite, points, 0)), axis=1, keepdims=True)
    ok = finite & (mx > 0)
    z = jnp.where(ok, points / jnp.where(ok, mx, 1), 0)
    n = jnp.linalg.norm(z, axis=1, keepdims=True)
    return jnp.where(ok, z / jnp.where(ok, n, 1), 0)


class _Geometry(NamedTuple):
    K: jax.Array  # (p, p) unit Gram
    valid: jax.Array  # (p,) bool
    D: jax.Array  # (p, p) ||x_i - x_j||^2
    pair_ok: jax.Array  # (p, p) bool: i != j, both valid, x_i != x_j


def _geometry(K: jax.Array, valid: jax.Array) -> _Geometry:
    p = K.shape[0]
    dg = jnp.diagonal(K)
    D = jnp.maximum(dg[:, None] + dg[None, :] - 2 * K, 0)
    tiny = 64 * jnp.finfo(K.dtype).eps
    pair_ok = valid[:, None] & valid[None, :] & ~jnp.eye(p, dtype=bool) & (D > tiny)
    return _Geometry(K, valid, D, pair_ok)


def _pair_coef(lam, p: int, dtype):
    return jnp.asarray(lam, dtype) / max(p - 1, 1)


# XLA:CPU runs a tiny dot as a library call costing ~1.1 us whatever its size, but a broadcast-multiply-
# reduce of the same size as one fused loop costing ~0.25 us (p = 15, r = 8; benchmarks/aggregation.py's
# solver rows). Below this many multiply-adds the p x p solver uses the fused form on CPU.
_CPU_SMALL_DOT = 1 << 13


def _dot(a, b):
    """a @ b for the p x p solver: full precision (GPUs would round float32 to TF32), and on CPU a
    fused broadcast-reduce when the product is tiny (see ``_CPU_SMALL_DOT``)."""
    full = lambda a, b: jnp.dot(a, b, precision=lax.Precision.HIGHEST)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] * a.shape[1] * b.shape[1] > _CPU_SMALL_DOT:
        return full(a, b)
    fused = lambda a, b: jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
    return lax.platform_dependent(a, b, cpu=fused, default=full)


def _laplacian_weights(geo: _Geometry, b: jax.Array) -> jax.Array:
    """(p, p) off-diagonal weights 2 b_ij / ||x_i - x_j||^2 of the pairwise term's Laplacian."""
    return jnp.where(geo.pair_ok, 2 * b / jnp.where(geo.pair_ok, geo.D, 1), 0)


def _basis_coeffs_eigh(geo: _Geometry, a: jax.Array, b: jax.Array | None, r: int) -> jax.Array:
    """Reference path: top-r eigenvectors of X W X^T by two eigh calls, as p x r coefficients C
    (Y = X C); zero columns past the rank. ``b=None``: no pairwise term, so W = diag(a)."""
    K = geo.K
    dtype = K.dtype
    if b is None:
        F = jnp.diag(jnp.sqrt(a))
    else:
        Bt = _laplacian_weights(geo, b)
        W = jnp.diag(a + Bt.sum(axis=1)) - Bt
        W = (W + W.T) / 2
        wl, Q = jnp.linalg.eigh(W)
        F = Q * jnp.sqrt(jnp.maximum(wl, 0))[None, :]
    S = _dot(_dot(F.T, K), F)
    S = (S + S.T) / 2
    mu, U = jnp.linalg.eigh(S)  # ascending
    mu = mu[::-1][:r]
    U = U[:, ::-1][:, :r]
    rtol = 8 * K.shape[0] * jnp.finfo(dtype).eps
    keep = mu > rtol * jnp.maximum(mu[0], jnp.finfo(dtype).tiny)
    inv = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, mu, 1)), 0)
    return _dot(F, U) * inv[None, :]


def _cholesky_pass(C, KC, *, shift, drop):
    """One Cholesky-QR pass in the metric K (see :func:`_cholesky_qr`)."""
    dtype = C.dtype
    G = _dot(C.T, KC)
    g = jnp.diagonal(G)
    live = g > jnp.finfo(dtype).tiny * 16
    s = jnp.where(live, lax.rsqrt(jnp.where(live, g, 1)), 0)
    Gs = G * s[:, None] * s[None, :]
    Gs = jnp.where(live[:, None] & live[None, :], (Gs + Gs.T) / 2, 0)
    Gs = Gs + jnp.diag(jnp.where(live, shift, 1).astype(dtype))
    L = jnp.linalg.cholesky(Gs)
    if drop is not None:
        live = live & (jnp.diagonal(L) ** 2 > drop)
    both = jnp.concatenate([C, KC], axis=0) * s[None, :]
    both = jax.scipy.linalg.solve_triangular(L, both.T, lower=True).T
    both = jnp.where(live[None, :], both, 0)
    p = C.shape[0]
    return both[:p], both[p:], jnp.all(jnp.isfinite(L))


def _cholesky_qr(C, KC, *, shift):
    """K-orthonormalise the columns of C (Gram-Schmidt in the metric K by Cholesky factors of the
    r x r matrix C^T K C; CholeskyQR2): returns (C', K C') with span(C') = span(C) and
    C'^T K C' = I to working precision. Both passes equilibrate the columns; the first adds a
    relative ``shift`` to the diagonal so that nearly dependent columns (an ill-conditioned C) cannot
    blow up, the second restores exact orthonormality and drops (zeroes) a column whose direction
    still lies in the span of the earlier ones. When the points span fewer than r dimensions
    (rank-deficient stacks) the second pass's factor fails instead, and the first pass's result is
    kept; its rounding-noise columns are zeroed by :func:`_reorthonormalise` at the end. Returns
    (C', K C', ok) with ``ok`` whether the second pass succeeded (C' exactly K-orthonormal)."""
    C1, KC1, _ = _cholesky_pass(C, KC, shift=shift, drop=None)
    # the second pass sees nearly orthonormal columns: its shift must be at rounding level, or the
    # result is only orthonormal to within the shift, and ratios near 1 (points in the subspace,
    # whose IRLS weights are large) come out visibly below 1
    C2, KC2, ok = _cholesky_pass(C1, KC1, shift=4 * float(jnp.finfo(C.dtype).eps), drop=0.01)
    # when the points span fewer than r dimensions the first pass leaves dependent columns as small
    # rounding noise, the second pass's Cholesky then fails (NaN): keep the first pass's result, whose
    # noise columns :func:`_reorthonormalise` zeroes at the end
    return jnp.where(ok, C2, C1), jnp.where(ok, KC2, KC1), ok


def _subspace_step(geo: _Geometry, a, Bt, C, KC, *, shift, exact: bool = True):
    """One orthogonal (subspace) iteration for the top-r eigenvectors of M = X W X^T in coefficient
    space: M (X C) = X (W K C), so C <- orth_K(W K C). Matmuls and r x r Cholesky factors only.

    ``exact=True`` orthonormalises with CholeskyQR2 (:func:`_cholesky_qr`; the last iteration before an
    evaluation of the objective), ``exact=False`` with the shifted first pass alone: the same span,
    orthonormal only to within the shift, which is all the next iteration needs. Every
    application of W K is orthonormalised: two applications under one orthonormalisation lose the weaker
    directions to rounding in float32 (the IRLS weights reach eps^-1/2; measured, objectives up to 2.7x
    the exact path's). Returns (C', K C', ok): ``ok`` is whether the exact second pass succeeded
    (False otherwise)."""
    WV = a[:, None] * KC
    if Bt is not None:
        WV = WV + Bt.sum(axis=1)[:, None] * KC - _dot(Bt, KC)
    KWV = _dot(geo.K, WV)
    if exact:
        return _cholesky_qr(WV, KWV, shift=shift)
    return (*_cholesky_pass(WV, KWV, shift=shift, drop=None)[:2], jnp.array(False))


def _evaluate(geo: _Geometry, V: jax.Array, lam, eps, pairwise: bool):
    """Objective A(Y) and the next IRLS weights (a, b) from V = K C (row i = Y^T x_i, Y = X C
    orthonormal). ``pairwise=False`` (lam statically 0) skips the pairwise term (b = None)."""
    K, valid, D, pair_ok = geo
    p = K.shape[0]
    dtype = K.dtype
    n2 = jnp.sum(V * V, axis=1)
    ratios = jnp.where(valid, jnp.clip(n2, 0, 1), 0)
    s = jnp.where(valid, 1 - ratios, 0)
    obj = jnp.sum(jnp.sqrt(s))
    a = jnp.where(valid, lax.rsqrt(s + eps), 0)
    if not pairwise:
        return obj, ratios, a, None
    # ||Y^T (x_i - x_j)||^2 = n_i + n_j - 2 <v_i, v_j>
    u = jnp.maximum(n2[:, None] + n2[None, :] - 2 * _dot(V, V.T), 0) / jnp.where(pair_ok, D, 1)
    t = jnp.where(pair_ok, 1 - jnp.clip(u, 0, 1), 0)
    coef = _pair_coef(lam, p, dtype)
    obj = obj + coef * jnp.sum(jnp.sqrt(t))
    b = jnp.where(pair_ok, coef * lax.rsqrt(t + eps), 0)
    return obj, ratios, a, b


class _State(NamedTuple):
    C: jax.Array
    KC: jax.Array
    exact_ok: jax.Array  # C came from a successful exact (second) Cholesky-QR pass
    weights: jax.Array
    obj: jax.Array
    ratios: jax.Array
    next_a: jax.Array
    next_b: jax.Array | None
    step: jax.Array
    trace: jax.Array
    converged: jax.Array


def _canonical_signs(C: jax.Array, KC: jax.Array) -> jax.Array:
    """Flip each column of C so that its inner product with sum_i x_i, the column sum of K C, is >= 0
    (a canonical basis for jit/eager comparisons); C must already be K-orthonormal, with the columns
    past the rank zero."""
    return C * jnp.where(jnp.sum(KC, axis=0) < 0, -1, 1).astype(C.dtype)[None, :]


def _reorthonormalise(K: jax.Array, C: jax.Array) -> jax.Array:
    """C -> C L^-T with C^T K C = L L^T (Gram-Schmidt in the K metric), so (X C)^T (X C) = I to
    working precision; column order is kept, columns of K-norm^2 below 1/2 (past the rank) become zero,
    and each column's sign is fixed by :func:`_canonical_signs`."""
    KC = _dot(K, C)
    zero = jnp.sum(C * KC, axis=0) < 0.5
    C = jnp.where(zero[None, :], 0, C)
    KC = jnp.where(zero[None, :], 0, KC)
    C, KC, _ = _cholesky_pass(C, KC, shift=4 * float(jnp.finfo(C.dtype).eps), drop=None)
    return _canonical_signs(C, KC)


METHODS = ("subspace", "subspace_xla", "pallas", "native", "eigh")
INNER_ITERS = 2  #: default subspace iterations per IRLS step (warm-started)
START_ITERS = 8  #: default subspace iterations for the flag-mean start (from a fixed Gaussian block)


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def solver_options(method: str, inner_iters: int, start_iters: int, lam) -> tuple:
    """Checked static solver options as a hashable tuple of (name, value) for :func:`solve_gram`.

    ``pairwise`` is False exactly when ``lam`` is a Python number equal to 0 (known when tracing),
    so the pairwise term's p x p work is left out of the program; a traced ``lam`` keeps it."""
    _check_method(method)
    for name, v in (("inner_iters", inner_iters), ("start_iters", start_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive Python int (static); got {v!r}")
    pairwise = not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam == 0)
    return (("inner_iters", inner_iters), ("method", method), ("pairwise", pairwise), ("start_iters", start_iters))


def _start_block(K: jax.Array, valid: jax.Array, r: int) -> jax.Array:
    """(p, r) start of the subspace iteration: rows of a fixed Gaussian block (a constant of the
    program, so no start column is orthogonal to the top eigenvectors except by accident), handed
    out to the points in the order of their summed cosines K 1 (largest first; invalid rows last, with
    zero rows). So the start, and with it the whole iteration, follows any permutation of the points,
    and a stack with some rows dropped starts its valid rows exactly as the stack without them does."""
    p = K.shape[0]
    omega = jnp.asarray(np.random.default_rng(0).standard_normal((p, r)), K.dtype)
    key = jnp.where(valid, K.sum(axis=1), -jnp.inf)
    # rank_i = #{j: key_j > key_i} + #{j < i: key_j = key_i}: the position of i in a stable descending
    # sort, as one fused p x p comparison (XLA:CPU runs a sort as a slow comparator loop)
    idx = jnp.arange(p)
    above = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(above, axis=1)
    return jnp.where(valid[:, None], omega[rank], 0)


def warm_start_block(K: jax.Array, valid: jax.Array, r: int, start: jax.Array | None = None) -> jax.Array:
    """(p, r) start of the subspace iteration: the columns of ``start`` (rows of invalid points zeroed)
    where they are alive in the K metric, the fixed Gaussian block's (:func:`_start_block`) elsewhere;
    that block alone when ``start`` is None. A warm start passes the previous round's coefficients C
    (Y = X C): the same workers' new rows X' give the start Y' = X' C, a good one when gradients change
    little from round to round. A zero start (the first round) gives the cold start exactly, and a
    column that was zero (the previous points spanned fewer than r dimensions) is refilled, so no
    direction stays lost. The subspace iteration that follows orthonormalises the block.

    Args:
      K: (p, p) unit Gram matrix. valid: (p,) bool. r: static rank.
      start: optional (p, r) float array.
    """
    cold = _start_block(K, valid, r)
    if start is None:
        return cold
    if start.shape != cold.shape:
        raise ValueError(f"start must be a (p, r) = {cold.shape} array of coefficients; got shape {start.shape}")
    s = jnp.where(valid[:, None], start.astype(K.dtype), 0)
    s = jnp.where(jnp.isfinite(s), s, 0)
    live = jnp.sum(s * _dot(K, s), axis=0) > 16 * jnp.finfo(K.dtype).tiny
    return jnp.where(live[None, :], s, cold)


def solve_gram(
    K: jax.Array,
    valid: jax.Array,
    lam=0.0,
    eps=1e-6,
    tol=1e-5,
    *,
    r: int,
    max_iters: int = 10,
    method: str = "subspace",
    inner_iters: int = INNER_ITERS,
    start_iters: int = START_ITERS,
    pairwise: bool = True,
    start: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Flag-median IRLS entirely in p-space (the inner solver of :func:`flag_median`).

    Runs exactly ``max_iters`` IRLS steps (a loop with a static trip count, so nothing goes back to
    the host on an accelerator); once the relative objective decrease falls below ``tol`` the state
    is frozen by a select, so the result, ``num_steps`` and the trace are those of a loop that stopped
    there.

    How each step's top-r eigenvectors of M = X W X^T are found (docs/guide.md, "The solver"):

    * ``method="subspace"`` (default): orthogonal iteration in coefficient space, C <- orth_K(W K C),
      with a CholeskyQR2 orthonormalisation in the K metric: matmuls and r x r Cholesky factors, no
      eigendecomposition. The flag-mean start runs ``start_iters`` iterations from a fixed Gaussian
      block; every IRLS step then runs ``inner_iters`` iterations warm-started from the previous
      step's basis. Each step is an inexact majorise-minimise step: the span converges at the rate
      mu_{r+1} / mu_r per iteration, so where the eigen-gap at r is small (a bulk of similar
      eigenvalues, as for honest gradients that differ by noise) the iterates follow another path than
      exact IRLS: measured, the objective ends within -5% .. +4% of the exact path's (lower about as
      often as higher) and the aggregate mostly agrees to cosine > 0.9999, but not always (0.977 to
      the honest mean on the demo's honest rows, against 0.9996 exactly). With lam a Python 0 the
      same loop runs as one call: on an NVIDIA GPU with p <= :data:`flagjax.solver_kernel.MAX_P` a
      Pallas kernel (:mod:`flagjax.solver_kernel`), on CPU with p <= :data:`flagjax.native.SOLVE_MAX_P`
      the compiled kernel (:func:`flagjax.native.flag_solve`, when built); elsewhere the XLA loop.
    * ``method="subspace_xla"``: the XLA loop everywhere; ``method="pallas"``: the Pallas kernel
      everywhere (interpreted on CPU, which is slow: for tests); ``method="native"``: the compiled CPU
      kernel at any p (CPU only, lam a Python 0).
    * ``method="eigh"``: the exact reference, ``eigh`` calls per step (one for W^1/2 when the
      pairwise term is on, one for the p x p matrix S = W^1/2 K W^1/2).

    Args:
      K: (p, p) Gram matrix of unit directions (zero rows/columns and diagonal for invalid rows).
      valid: (p,) bool mask of rows that take part.
      lam, eps, tol: scalars (traced; vmap over them): pairwise weight, IRLS smoothing, and the
        relative objective decrease below which the loop stops.
      r: static subspace rank, 1 <= r <= p.
      max_iters: static number of IRLS steps after the flag-mean start.
      method: static, one of :data:`METHODS`.
      inner_iters, start_iters: static iteration counts of the subspace method (ignored by "eigh").
      pairwise: static; False drops the pairwise term's work (only valid when lam is 0).
      start: optional (p, r) coefficients to start the subspace iteration from instead of the fixed
        Gaussian block (a warm start: the previous round's basis, Y = X start; see
        :func:`warm_start_block`); ignored by ``method="eigh"``.

    Returns:
      (C, ratios, weights, objective, trace, num_steps, converged): C is (p, r) with Y = X C.
    """
    _check_method(method)
    p = K.shape[0]
    dtype = K.dtype
    lam = jnp.asarray(lam, dtype)
    eps = jnp.asarray(eps, dtype)
    tol = jnp.asarray(tol, dtype)
    shift = float(8 * r * jnp.finfo(dtype).eps) if dtype == jnp.float64 else float(32 * r * jnp.finfo(dtype).eps)
    kernel_ok = not pairwise and p <= solver_kernel.MAX_P
    if method == "pallas" and not kernel_ok:
        raise ValueError(
            f"method='pallas' runs lam = 0 (a Python 0, so the pairwise term is left out) and p <= "
            f"{solver_kernel.MAX_P}; got lam {'traced or non-zero' if pairwise else '0'} and p = {p}"
        )
    native_ok = not pairwise and native.available()
    if method == "native" and not native_ok:
        why = native.unavailable_reason() or "lam must be a Python 0 (the kernel leaves the pairwise term out)"
        raise ValueError(f"method='native' runs the compiled CPU kernel: {why}")
    # the kernel branch is traced only where a GPU is the default backend: tracing it costs about a
    # second per compiled program, which a CPU-only process would pay for nothing
    gpu = jax.default_backend() == "gpu"
    cpu_kernel = method == "native" or (method == "subspace" and native_ok and p <= native.SOLVE_MAX_P and not gpu)
    gpu_kernel = method == "pallas" or (method == "subspace" and kernel_ok and gpu)
    if cpu_kernel or gpu_kernel:
        args = (K, valid, warm_start_block(K, valid, r, start), eps, tol)
        iters = dict(max_iters=max_iters, inner_iters=inner_iters, start_iters=start_iters, shift=shift)

        # "subspace" off the kernel's platform: the XLA loop below (same algorithm)
        def xla_loop(*_):
            opts = dict(inner_iters=inner_iters, start_iters=start_iters, pairwise=pairwise, start=start)
            return solve_gram(K, valid, lam, eps, tol, r=r, max_iters=max_iters, method="subspace_xla", **opts)

        if cpu_kernel:

            def compiled(K, valid, C0, eps, tol):
                C, KC, ratios, weights, obj, trace, steps, converged, ok = native.flag_solve(
                    K, valid, C0, eps, tol, **iters
                )
                # as after the XLA loop: the last exact pass left C K-orthonormal, else re-orthonormalise
                C = lax.cond(ok, _canonical_signs, lambda C, _: _reorthonormalise(K, C), C, KC)
                return C, ratios, weights, obj, trace, steps, converged

            if method == "native":
                return compiled(*args)
            return lax.platform_dependent(*args, cpu=compiled, default=xla_loop)
        kernel = lambda *a: solver_kernel.solve_gram_kernel(*a, r=r, **iters)  # noqa: E731
        if method == "pallas":  # everywhere; interpreted on CPU (tests)
            interpreted = lambda *a: solver_kernel.solve_gram_kernel(*a, r=r, **iters, interpret=True)  # noqa: E731
            return lax.platform_dependent(*args, cpu=interpreted, default=kernel)
        return lax.platform_dependent(*args, cuda=kernel, default=xla_loop)
    geo = _geometry(K, valid)
    a0 = valid.astype(dtype)
    b0 = jnp.where(geo.pair_ok, _pair_coef(lam, p, dtype), 0) if pairwise else None

    def solve(a, b, C, KC, iters):
        if method == "eigh":
            C = _basis_coeffs_eigh(geo, a, b, r)
            return C, _dot(K, C), jnp.array(False)
        Bt = None if b is None else _laplacian_weights(geo, b)
        step = lambda _, c: _subspace_step(geo, a, Bt, *c, shift=shift, exact=False)[:2]
        C, KC = lax.fori_loop(0, iters - 1, step, (C, KC), unroll=min(iters - 1, 2) or 1)
        return _subspace_step(geo, a, Bt, C, KC, shift=shift)

    C0 = warm_start_block(K, valid, r, start)
    C0, KC0 = _cholesky_pass(C0, _dot(K, C0), shift=shift, drop=None)[:2] if method != "eigh" else (C0, C0)
    C0, KC0, ok0 = solve(a0, b0, C0, KC0, start_iters)
    obj0, ratios0, na, nb = _evaluate(geo, KC0, lam, eps, pairwise)
    trace0 = jnp.full((max_iters + 1,), jnp.nan, dtype).at[0].set(obj0)
    state = _State(C0, KC0, ok0, a0, obj0, ratios0, na, nb, jnp.int32(0), trace0, jnp.array(False))

    def body(_, st: _State):
        C, KC, ok = solve(st.next_a, st.next_b, st.C, st.KC, inner_iters)
        obj, ratios, na, nb = _evaluate(geo, KC, lam, eps, pairwise)
        dec = (st.obj - obj) / jnp.maximum(jnp.abs(st.obj), jnp.finfo(dtype).tiny)
        step = st.step + 1
        new = _State(C, KC, ok, st.next_a, obj, ratios, na, nb, step, st.trace.at[step].set(obj), dec < tol)
        return jax.tree.map(lambda old, nw: jnp.where(st.converged, old, nw), st, new)

    st = lax.fori_loop(0, max_iters, body, state)
    # the final exact pass left C K-orthonormal with dropped columns zeroed: only the sign is fixed; when
    # it failed (the points span fewer than r dimensions) or eigh produced C, the full re-orthonormalisation
    C = lax.cond(st.exact_ok, _canonical_signs, lambda C, _: _reorthonormalise(K, C), st.C, st.KC)
    return C, st.ratios, st.weights, st.obj, st.trace, st.step, st.converged


def status_code(valid: jax.Array, converged: jax.Array) -> jax.Array:
    """() int32 :class:`FlagStatus`: NONFINITE_INPUT if any row was dropped, else CONVERGED/MAX_STEPS."""
    return jnp.where(
        ~jnp.all(valid),
        FlagStatus.NONFINITE_INPUT,
        jnp.where(converged, FlagStatus.CONVERGED, FlagStatus.MAX_STEPS),
    ).astype(jnp.int32)


def _check_points(points, r):
    if not hasattr(points, "ndim") or points.ndim != 2:
        raise ValueError(
            f"points must be a (p, d) array (one row per worker); got shape "
            f"{getattr(points, 'shape', type(points).__name__)}"
        )
    p = points.shape[0]
    if p < 1 or points.shape[1] < 1:
        raise ValueError(f"points must have p >= 1 rows and d >= 1 columns; got {points.shape}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be a Python int (static), got {r!r}")
    if not 1 <= r <= p:
        raise ValueError(f"r must satisfy 1 <= r <= p = {p}; got r = {r}")


def _check_iters(max_iters):
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters must be a non-negative Python int (static); got {max_iters!r}")


def flag_median(
    points: jax.Array,
    r: int,
    *,
    lam=0.0,
    eps=1e-6,
    max_iters: int = 10,
    tol=1e-5,
    method: str = "subspace",
    inner_iters: int = INNER_ITERS,
    start_iters: int = START_ITERS,
) -> FlagSolution:
    """Flag median of the rows of ``points`` by IRLS in Gram space (paper eq. 5, Algorithm 1).

    Starts from the flag mean (all weights 1, pairwise weights lam/(p-1)), then runs up to
    ``max_iters`` IRLS steps (a fixed trip count; converged values are frozen), stopping when
    (A_{t-1} - A_t) / |A_{t-1}| < tol. Non-finite and zero
    rows get weight 0 and are reported in ``valid``/``status``. Jit with ``r``/``max_iters`` static;
    ``lam``, ``eps`` and ``tol`` are traced, so ``jax.vmap`` over them (or over a batch of stacks)
    works.

    Args:
      points: (p, d) float array, one row per worker (normalised inside; any positive scale of a row
        gives the same solution).
      r: static int, 1 <= r <= p, dimension of the subspace.
      lam: scalar >= 0, weight of the pairwise regulariser (on unit directions).
      eps: scalar > 0, IRLS smoothing in a_i = (1 - v_i + eps)^(-1/2).
      max_iters: static int >= 0, maximum IRLS steps after the flag mean (0 returns the flag mean).
      tol: scalar, relative objective decrease that stops the loop.
      method, inner_iters, start_iters: static; how each step's top-r eigenvectors are found, see
        :func:`solve_gram` ("subspace", the default, calls no eigendecomposition; "eigh" is exact).

    Returns:
      A :class:`FlagSolution`; float dtype is float32, or float64 for float64 input.
    """
    _check_points(points, r)
    _check_iters(max_iters)
    opts = solver_options(method, inner_iters, start_iters, lam)
    # one compiled program per (shape, dtype, r, max_iters): called eagerly (a notebook, a test, the
    # released-code comparison), op-by-op dispatch costs seconds per new shape and ~0.1 s per call
    # (benchmarks/eager_calls.py); inside an outer jit/vmap this is a nested call
    return _flag_median_jit(jnp.asarray(points), lam, eps, tol, r=r, max_iters=max_iters, opts=opts)


@functools.partial(jax.jit, static_argnames=("r", "max_iters", "opts"))
def _flag_median_jit(points, lam, eps, tol, *, r: int, max_iters: int, opts: tuple) -> FlagSolution:
    info = prepare_gram(points)
    C, ratios, weights, obj, trace, steps, converged = solve_gram(
        info.K, info.valid, lam, eps, tol, r=r, max_iters=max_iters, **dict(opts)
    )
    X = unit_rows(points)
    basis = jnp.dot(X.T, C, precision=lax.Precision.HIGHEST)
    status = status_code(info.valid, converged)
    return FlagSolution(basis, C, ratios, weights, obj, trace, steps, status, info.valid)


def objective(points: jax.Array, basis: jax.Array, *, lam=0.0) -> jax.Array:
    """The flag-median objective A(Y) of paper eq. 5 for an orthonormal ``basis`` (d, r).

    Direct d-space evaluation (no IRLS), for checking solutions: invalid rows are ignored.
    """
    X = unit_rows(points)
    p = X.shape[0]
    valid = jnp.any(X != 0, axis=1)
    proj = X @ basis
    v = jnp.clip(jnp.sum(proj * proj, axis=1), 0, 1)
    term1 = jnp.sum(jnp.where(valid, jnp.sqrt(1 - v), 0))
    diff = X[:, None, :] - X[None, :, :]
    n2 = jnp.sum(diff * diff, axis=-1)
    geo = _geometry(X @ X.T, valid)
    pd = jnp.einsum("ijd,dr->ijr", diff, basis)
    u = jnp.sum(pd * pd, axis=-1) / jnp.where(geo.pair_ok, n2, 1)
    term2 = jnp.sum(jnp.where(geo.pair_ok, jnp.sqrt(1 - jnp.clip(u, 0, 1)), 0))
    return term1 + _pair_coef(lam, p, X.dtype) * term2
