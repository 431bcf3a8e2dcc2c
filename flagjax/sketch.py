"""A seeded count sketch of the rows of a (p, d) stack, and the sketched Gram matrix built from it.

Every rule that works from the p x p Gram matrix (FA, Krum, Multi-Krum, Bulyan's selection, geomed,
MDA, CAF, SMEA, NNM) can take ``sketch=k``: its inner products come from a k-column sketch of the rows instead
of the O(p^2 d) exact product, while the row norms stay exact and the output stays an exact
combination sum_i c_i g_i of the rows (docs/design.md section 6).

The sketch (Charikar, Chen, Farach-Colton 2002; Weinberger et al. 2009's feature hashing) sends global
column j, with sign s(j) = +-1, to bucket h(j), and S_i[b] = sum_{j: h(j) = b} s(j) g_ij. Here the
columns are cut into blocks of k consecutive indices and block t is rotated by a hashed shift
sigma(t): h(j) = (j mod k + sigma(j div k)) mod k. So

* two columns of one block never share a bucket, two columns of different blocks share one with
  probability 1/k (sigma uniform): the count sketch's collision rate;
* with independent signs, <S_a, S_b> is an unbiased estimate of <g_a, g_b> with variance at most
  (||g_a||^2 ||g_b||^2 + <g_a, g_b>^2) / k, the count sketch's bound (so a sketched cosine is off by
  about 1 / sqrt(k));
* no k x d matrix exists anywhere: signs and shifts come from a 32-bit integer hash of (seed, index);
* it is linear in the columns, so partial sketches of column slices (``offset`` = the slice's first
  global column) add up to the sketch of the whole row: the sharded layout psums them, and the sketch
  is the same on any layout and device count.

The sketched Gram matrix keeps the exact norms and replaces each cosine by the sketch's:
raw_ij = ||g_i|| ||g_j|| <S_i, S_j> / (||S_i|| ||S_j||). It is symmetric positive semidefinite with the
exact diagonal, so every Gram-space rule runs on it unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flagjax import native

__all__ = [
    "sketch_and_norms",
    "sketch_rows",
    "sketch_adjoint",
    "sketched_gram",
    "SKETCH_METHODS",
    "sketch_gram_from_parts",
    "check_sketch",
    "seed_from_key",
    "resolve_seed",
]

_HIGH = lax.Precision.HIGHEST


def check_sketch(sketch, where: str = "sketch") -> int:
    """The checked sketch width: a Python int >= 0 (0 = the exact Gram matrix). ``ValueError`` naming
    ``where`` otherwise (a traced or batched value would change shapes, so it is refused)."""
    if isinstance(sketch, bool) or not isinstance(sketch, (int, np.integer)) or sketch < 0:
        raise ValueError(
            f"{where} must be a Python int >= 0 (0 = exact Gram matrix, k > 0 = a k-column count sketch; "
            f"static, it sets shapes); got {sketch!r}"
        )
    return int(sketch)


def _hash32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (Wellons' lowbias32): uint32 -> uint32, every output bit depends on
    every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _stream(seed: jax.Array, salt: int) -> jax.Array:
    return _hash32(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32(salt))


def _signs(seed, cols: jax.Array, dtype) -> jax.Array:
    h = _hash32(cols.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + _stream(seed, 0x5BD1E995))
    return (1 - 2 * (h >> 31).astype(jnp.int32)).astype(dtype)


def _shifts(seed, blocks: jax.Array, k: int) -> jax.Array:
    h = _hash32(blocks.astype(jnp.uint32) * jnp.uint32(0x85EBCA77) + _stream(seed, 0x27D4EB2F))
    return (h % jnp.uint32(k)).astype(jnp.int32)


def seed_from_key(key: jax.Array) -> jax.Array:
    """A () uint32 sketch seed drawn from a PRNG key (the rules' default: a fresh projection every
    round, so an attacker cannot tune its rows to a known sketch)."""
    return jax.random.bits(jax.random.fold_in(key, 0x5C), (), jnp.uint32)


def resolve_seed(sketch_seed, key) -> jax.Array:
    """The () uint32 seed a rule sketches with: ``sketch_seed`` when given (an int: the same
    projection every round), else one drawn from the round's ``key`` (:func:`seed_from_key`, the
    default). ``ValueError`` when both are None."""
    if sketch_seed is not None:
        if isinstance(sketch_seed, (int, np.integer)) and not 0 <= int(sketch_seed) < 2**32:
            raise ValueError(f"sketch_seed must be in [0, 2**32); got {sketch_seed}")
        return jnp.asarray(sketch_seed).astype(jnp.uint32)
    if key is None:
        raise ValueError("a sketched rule needs a PRNG key (flagjax.aggregate passes one) or an explicit sketch_seed")
    return seed_from_key(key)


# CPU: rows per scan, so that the (rows, 2k) accumulator stays in cache (8192 // k rows: 64 KiB of
# float32), and blocks per scan iteration (unrolled). Measured at p = 256, d = 2e5, k = 1024 on this
# CPU: the whole stack in one scan 73 ms, 8 rows and 8 blocks per iteration 22 ms, the mean 8 ms.
# Hashing the signs once for all row groups instead of in every group's scan: 39 -> 31 ms with a traced
# seed (the mean 8 ms; 4 or 16 rows per scan 33 / 31 ms, 32 rows 34-39 ms).
_CPU_ACC_FLOATS = 8192
_CPU_UNROLL = 8


def _rows_per_scan(p: int, k: int) -> int:
    """The largest divisor of p that is at most max(1, 8192 // k) (no padded copy of the stack)."""
    target = max(1, _CPU_ACC_FLOATS // k)
    return max(q for q in range(1, min(p, target) + 1) if p % q == 0)


def _block_hashes(x, k, first_block, seed):
    """(signs (nb, k) of x's dtype, shifts (nb,) int32) of the nb = ceil(m / k) blocks of x (p, m), whose
    column 0 is the first column of global block ``first_block``: every column's sign hashed once ((nb,
    k), 1/p of the stack) rather than once per group of rows."""
    nb = math.ceil(x.shape[1] / k)
    shifts = _shifts(seed, first_block + jnp.arange(nb, dtype=jnp.int32), k)
    signs = _signs(seed, first_block * k + jnp.arange(nb * k, dtype=jnp.int32), x.dtype).reshape(nb, k)
    return signs, shifts


def _fold_scan(x, signs, shifts):
    """CPU, pure XLA: (S, n2) of the rows of x (p, m) for the blocks' ``signs`` (nb, k) and ``shifts``
    (nb,). For each group of rows, a scan over the blocks adds each signed block into a doubled (rows,
    2k) accumulator at its shift (the fold acc[:, :k] + acc[:, k:] is the rotation) and its squares into
    the norms; a last partial block is padded on its own (no copy of the stack)."""
    p, m = x.shape
    k = signs.shape[1]
    nfull, rem = divmod(m, k)
    rb = _rows_per_scan(p, k)

    def add(carry, blk, t):
        acc, n2 = carry
        blk = blk * signs[t][None, :]
        cur = lax.dynamic_slice_in_dim(acc, shifts[t], k, axis=1)
        acc = lax.dynamic_update_slice_in_dim(acc, cur + blk, shifts[t], axis=1)
        return acc, n2 + jnp.sum(blk * blk, axis=1)

    def rows(g):
        # the group's blocks are sliced from x itself: a (rb, m) copy of each group first is one more pass
        # over the whole stack (p = 256, d = 2e5, k = 1024: 27 -> 24 ms in one A/B run, which is within this
        # machine's run-to-run spread)
        r0 = g * rb
        carry = (jnp.zeros((rb, 2 * k), x.dtype), jnp.zeros((rb,), x.dtype))
        if nfull:
            body = lambda c, t: (add(c, lax.dynamic_slice(x, (r0, t * k), (rb, k)), t), None)  # noqa: E731
            carry, _ = lax.scan(body, carry, jnp.arange(nfull), unroll=max(1, min(nfull, _CPU_UNROLL)))
        if rem:
            tail = lax.dynamic_slice(x, (r0, nfull * k), (rb, rem))
            carry = add(carry, jnp.pad(tail, ((0, 0), (0, k - rem))), nfull)
        acc, n2 = carry
        return acc[:, :k] + acc[:, k:], n2

    if rb == p:
        return rows(0)
    S, n2 = lax.map(rows, jnp.arange(p // rb))
    return S.reshape(p, k), n2.reshape(p)


def _fold_cpu(x, k, first_block, seed):
    """CPU, pure XLA: :func:`_fold_scan` of x's blocks."""
    return _fold_scan(x, *_block_hashes(x, k, first_block, seed))


@jax.custom_jvp
def _native_fold(x, signs, shifts):
    return native.count_sketch(x, signs, shifts)


@_native_fold.defjvp
def _native_fold_jvp(primals, tangents):
    # the sketch is linear in x and the norms quadratic: the tangent is the XLA scan's fold of dx (linear,
    # so reverse mode transposes it) and 2 <x_i, dx_i>
    x, signs, shifts = primals
    dx = tangents[0]
    return _native_fold(x, signs, shifts), (_fold_scan(dx, signs, shifts)[0], 2 * jnp.sum(x * dx, axis=1))


def _fold_native(x, k, first_block, seed):
    """CPU, compiled: the same fold as :func:`_fold_cpu` in one custom call (:func:`flagjax.native.count_sketch`:
    one pass over the stack, both cores; bit-identical S). Differentiable (through the XLA fold)."""
    return _native_fold(x, *_block_hashes(x, k, first_block, seed))


def _gather(x, k, first_block, seed):
    """Accelerators: (S, n2) in one gather and a sum; bucket b takes column (b - shift_t) mod k of every
    block t (the stack is padded to whole blocks)."""
    p, m = x.shape
    nb = math.ceil(m / k)
    n2 = jnp.einsum("pd,pd->p", x, x, precision=_HIGH)
    x = jnp.pad(x, ((0, 0), (0, nb * k - m)))
    cols = first_block * k + jnp.arange(nb * k, dtype=jnp.int32)
    signed = (x * _signs(seed, cols, x.dtype)[None, :]).reshape(p, nb, k)
    shifts = _shifts(seed, first_block + jnp.arange(nb, dtype=jnp.int32), k)
    idx = (jnp.arange(k, dtype=jnp.int32)[None, :] - shifts[:, None]) % k
    return jnp.sum(jnp.take_along_axis(signed, idx[None], axis=2), axis=1), n2


SKETCH_METHODS = ("auto", "native", "scan", "gather")


def sketch_and_norms(points: jax.Array, k: int, *, seed, offset=0, method: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Count sketch and exact squared norms of each row, in one pass: (p, m) -> ((p, k), (p,)), for
    the global columns offset, ..., offset + m - 1.

    Args:
      points: (p, m) float array, the rows' global columns ``offset .. offset + m - 1``.
      k: static int >= 1, the sketch width.
      seed: () integer (uint32, traced or a Python int): the projection. The same seed gives the same
        projection on every device and layout.
      offset: the slice's first global column (a Python int or a traced int32); partial sketches and
        partial squared norms of disjoint slices add up to those of their union.
      method: static; "scan" adds the signed blocks one after another into a doubled (rows, 2k)
        accumulator, a few rows at a time (pure XLA, for CPU), "native" makes the same additions in one
        compiled custom call (CPU only, when :func:`flagjax.native.available`; bit-identical S; at p = 256,
        d = 2e5, k = 1024 16 ms in benchmarks/results/sketch.md, where "scan" took 27 ms the run before),
        "gather" takes every bucket's column of every block in one gather and sums
        (one kernel: for accelerators), "auto" (default) picks "native" on CPU ("scan" where the kernels
        were not built) and "gather" elsewhere. They agree up to summation order.

    Returns:
      (S, n2): S (p, k) with S_i[b] = sum_{j: h(j) = b} s(j) g_ij (the block-rotation hash of this
      module's docstring), n2 (p,) = ||g_i||^2 over the slice; float32 at least.
    """
    k = check_sketch(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1 for a sketch; got {k}")
    if method not in SKETCH_METHODS:
        raise ValueError(f"method must be one of {SKETCH_METHODS}; got {method!r}")
    if method == "native" and not native.available():
        raise ValueError(f"method='native' needs flagjax's compiled CPU kernels: {native.unavailable_reason()}")
    points = jnp.asarray(points)
    if points.ndim != 2:
        raise ValueError(f"points must be a (p, m) array; got shape {points.shape}")
    points = points.astype(jnp.promote_types(points.dtype, jnp.float32))
    p, m = points.shape
    if isinstance(offset, (int, np.integer)) and offset % k == 0:
        first_block = jnp.int32(offset // k)  # blocks are slices of the input: no copy
    else:
        # a slice starting mid-block (e.g. a traced offset in the sharded layout): place it in a zero
        # buffer aligned to its first global block
        offset = jnp.asarray(offset, jnp.int32)
        first_block = offset // k
        width = math.ceil((m + k - 1) / k) * k
        points = lax.dynamic_update_slice_in_dim(jnp.zeros((p, width), points.dtype), points, offset % k, axis=1)
    run = lambda fn: lambda x: fn(x, k, first_block, seed)  # noqa: E731
    if method == "scan":
        return run(_fold_cpu)(points)
    if method == "native":
        return run(_fold_native)(points)
    if method == "gather":
        return run(_gather)(points)
    cpu = _fold_native if native.available() else _fold_cpu
    return lax.platform_dependent(points, cpu=run(cpu), default=run(_gather))


def sketch_rows(points: jax.Array, k: int, *, seed, offset=0, method: str = "auto") -> jax.Array:
    """The (p, k) count sketch of :func:`sketch_and_norms` alone."""
    return sketch_and_norms(points, k, seed=seed, offset=offset, method=method)[0]


def sketch_adjoint(z: jax.Array, d: int, k: int, *, seed) -> jax.Array:
    """The sketch's transpose: (k,) -> (d,), x_j = s(j) z[h(j)], so that <sketch(g), z> = <g, x> for
    every row g of length d (column 0 at global index 0). With ``z`` the bucket averages of a
    sketch it lifts the sketch back to d-space (the ``sketch_null`` attack)."""
    k = check_sketch(k, "k")
    nb = math.ceil(d / k)
    z = jnp.asarray(z)
    dtype = jnp.promote_types(z.dtype, jnp.float32)
    shifts = _shifts(seed, jnp.arange(nb, dtype=jnp.int32), k)
    idx = (jnp.arange(k, dtype=jnp.int32)[None, :] + shifts[:, None]) % k
    x = z.astype(dtype)[idx].reshape(nb * k)[:d]
    return x * _signs(seed, jnp.arange(d, dtype=jnp.int32), dtype)


def sketch_gram_from_parts(S: jax.Array, n2: jax.Array) -> jax.Array:
    """The sketched raw Gram matrix from a (p, k) sketch ``S`` and exact squared norms ``n2`` (p,):
    raw_ij = ||g_i|| ||g_j|| <S_i, S_j> / (||S_i|| ||S_j||), raw_ii = n2_i exactly.

    A row whose squared norm is non-finite (NaN/Inf entries) keeps that diagonal so that
    :func:`flagjax.solver.gram_info_from_raw` and the distance rules see it as invalid; its off-diagonal
    entries are 0. A zero row (or a row whose sketch is 0) has zero off-diagonal entries.
    """
    dtype = S.dtype
    ok = jnp.isfinite(n2) & jnp.all(jnp.isfinite(S), axis=1)
    S = jnp.where(ok[:, None], S, 0)
    C = jnp.dot(S, S.T, precision=_HIGH)
    sn = jnp.sqrt(jnp.maximum(jnp.diagonal(C), 0))
    live = ok & (sn > 0)
    u = jnp.where(live, 1 / jnp.where(live, sn, 1), 0)
    cos = jnp.clip(C * u[:, None] * u[None, :], -1, 1)
    n = jnp.sqrt(jnp.where(ok, jnp.maximum(n2, 0), 0)).astype(dtype)
    raw = cos * n[:, None] * n[None, :]
    p = S.shape[0]
    return raw.at[jnp.diag_indices(p)].set(n2.astype(dtype))


def sketched_gram(points: jax.Array, k: int, *, seed, method: str = "auto") -> jax.Array:
    """(p, d) -> (p, p) sketched raw Gram matrix (:func:`sketch_gram_from_parts` of the k-column
    sketch and the exact squared norms, both from one pass over the stack); the drop-in for
    :func:`flagjax.solver.gram_matrix` when a rule is given ``sketch=k``: O(p d + p^2 k) instead of
    O(p^2 d)."""
    S, n2 = sketch_and_norms(points, k, seed=seed, method=method)
    return sketch_gram_from_parts(S, n2)
