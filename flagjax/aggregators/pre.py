"""Pre-aggregators: (p, d) -> (p', d) maps composable in front of any rule.

``flagjax.aggregate("krum", g, f=3, pre=("nnm",))`` or ``flagjax.aggregate("nnm+krum", g, f=3)``.
Each one is a p' x p mixing or scaling matrix computed in Gram space and applied in one pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flagjax.aggregators.distance import _work, combine, pairwise_sq_distances
from flagjax.aggregators.registry import PreAggregator, register_pre

__all__ = ["nnm", "bucketing", "arc", "clip", "row_norms"]

_HIGH = lax.Precision.HIGHEST


def row_norms(stack: jax.Array) -> jax.Array:
    """(p, d) -> (p,) Euclidean norms of the rows (float32 or wider)."""
    w = _work(stack)
    return jnp.sqrt(jnp.einsum("pd,pd->p", w, w, precision=_HIGH))


def _mix(M: jax.Array, stack: jax.Array) -> jax.Array:
    return jnp.dot(M.astype(stack.dtype), stack, precision=_HIGH)


def nnm(stack, *, f: int, key=None, sketch: int = 0, sketch_seed=None):
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023): each row becomes the mean of its
    p - f nearest rows (itself included). Requires f < p. ``sketch``/``sketch_seed``: neighbours from
    a sketched Gram matrix (:func:`flagjax.aggregators.distance.gram_and_valid`), e.g.
    ``pre=(("nnm", {"sketch": 1024}),)``. (p, d) -> (p, d)."""
    p = stack.shape[0]
    D, _, valid = pairwise_sq_distances(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    _, nn = lax.top_k(-D, p - f)  # (p, p - f)
    M = jnp.zeros((p, p), D.dtype).at[jnp.arange(p)[:, None], nn].set(1.0 / (p - f))
    return combine(M, stack, valid)


def bucketing(stack, *, f: int = 0, key, s: int = 2):
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022): randomly permute the rows (``key``) and average
    consecutive buckets of s rows (a last, smaller bucket takes the remainder, as in ByzFL).
    (p, d) -> (ceil(p / s), d)."""
    del f
    p = stack.shape[0]
    if s < 1:
        raise ValueError(f"s (bucket size) must be >= 1; got {s}")
    perm = jax.random.permutation(key, p)
    nb = -(-p // s)
    bucket_of_pos = jnp.arange(p) // s
    dtype = _work(stack).dtype
    sizes = jnp.bincount(bucket_of_pos, length=nb).astype(dtype)
    M = jnp.zeros((nb, p), dtype).at[bucket_of_pos, perm].set(1.0)
    return _mix(M / sizes[:, None], stack)


def _clip_to(stack, norms, thr):
    scale = jnp.minimum(1, thr / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))
    return stack * scale[:, None].astype(stack.dtype)


def clip(stack, *, f: int = 0, key=None, c=2.0):
    """Static norm clipping: g_i <- g_i * min(1, c / ||g_i||). (p, d) -> (p, d)."""
    del f, key
    return _clip_to(stack, row_norms(stack), jnp.asarray(c, jnp.float32))


def arc(stack, *, f: int, key=None):
    """Adaptive robust clipping (ARC; Allouah et al. 2024): clip the k = floor(2f/p * (p - f))
    largest-norm rows to the (p - k)-th smallest norm. (p, d) -> (p, d)."""
    del key
    p = stack.shape[0]
    k = int((2 * f / p) * (p - f))
    if k == 0:
        return stack
    norms = row_norms(stack)
    thr = jnp.sort(norms)[p - k - 1]
    return _clip_to(stack, norms, thr)


register_pre(PreAggregator("nnm", nnm, sketchable=True))
register_pre(PreAggregator("bucketing", bucketing))
register_pre(PreAggregator("clip", clip))
register_pre(PreAggregator("arc", arc))
