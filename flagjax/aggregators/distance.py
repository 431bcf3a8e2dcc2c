"""Distance-based rules, all in Gram space: Krum, Multi-Krum, Bulyan, geometric median, centered
clipping, MDA, MoNNA.

Pairwise squared distances come from one Gram product, ||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij (one
read of the (p, d) stack; measured ~40 ms for a JAX Krum at d = 1e6 in docs/jax_traps.md versus this
module's blocked Gram). Iterative rules (Weiszfeld, centered clipping) keep their iterate as a linear
combination sum_i c_i g_i, so every iteration costs O(p^2) and the stack is read once more at the end.
Overflowing distances (rows near float max) become +inf, which only ever makes a row look far away.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flagjax import sketch as sketching
from flagjax import solver
from flagjax.aggregators.coordinatewise import closest_window_mean, sorted_rows
from flagjax.aggregators.registry import Rule, register

__all__ = [
    "pairwise_sq_distances",
    "gram_and_valid",
    "combine",
    "masked_matvec",
    "krum_scores",
    "krum",
    "multi_krum",
    "bulyan",
    "geomed",
    "geomed_with_info",
    "GeomedInfo",
    "centered_clipping",
    "mda",
    "monna",
    "subsets",
]

_HIGH = lax.Precision.HIGHEST


def _work(stack):
    return stack.astype(jnp.promote_types(stack.dtype, jnp.float32))


def gram_and_valid(stack: jax.Array, *, sketch: int = 0, sketch_seed=None, key=None) -> tuple[jax.Array, jax.Array]:
    """Raw Gram matrix with non-finite rows zeroed, and the (p,) mask of finite rows.

    A row holding NaN/Inf (or whose squared norm overflows) has a non-finite Gram diagonal; its Gram
    row and column are set to 0, which is exactly the Gram matrix of the stack with that row replaced
    by zeros, without a pass over the data to sanitise it. Use :func:`combine` for the output.

    ``sketch=k > 0`` gives the sketched Gram matrix instead (:func:`flagjax.sketch.sketched_gram`:
    exact norms, cosines from a k-column count sketch seeded by ``sketch_seed`` or, by default, drawn
    from ``key``); every rule of this module that takes ``sketch`` passes it here.
    """
    if sketching.check_sketch(sketch):
        K = sketching.sketched_gram(_work(stack), sketch, seed=sketching.resolve_seed(sketch_seed, key))
    else:
        K = solver.gram_matrix(_work(stack))
    valid = jnp.isfinite(jnp.diagonal(K))
    return jnp.where(valid[:, None] & valid[None, :], K, 0), valid


def combine(w: jax.Array, stack: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """sum_i w_i g_i (one pass), or W @ stack for a (q, p) matrix; rows outside ``valid`` count as 0.

    The masked copy is only made when some row is invalid (``lax.cond``), so clean inputs pay nothing.
    """

    def plain(s):
        return jnp.dot(w.astype(s.dtype), s, precision=_HIGH)

    if valid is None:
        return plain(stack)
    return lax.cond(jnp.all(valid), plain, lambda s: plain(jnp.where(valid[:, None], s, 0)), stack)


def masked_matvec(stack: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """(p,) inner products <g_i, v>, 0 for rows outside ``valid`` (masked copy only when needed)."""

    def plain(s):
        return jnp.dot(s, v.astype(s.dtype), precision=_HIGH)

    return lax.cond(jnp.all(valid), plain, lambda s: plain(jnp.where(valid[:, None], s, 0)), stack)


def _distances_from_gram(K: jax.Array) -> jax.Array:
    n = jnp.diagonal(K)
    D = jnp.maximum(n[:, None] + n[None, :] - 2 * K, 0)
    D = jnp.where(jnp.isnan(D), jnp.inf, D)
    return D.at[jnp.diag_indices(K.shape[0])].set(0)


def pairwise_sq_distances(stack: jax.Array, **sketch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(p, d) -> ((p, p) squared distances, (p, p) Gram matrix, (p,) finite-row mask), via one Gram
    product; non-finite rows act as zero rows; ``sketch``, ``sketch_seed``, ``key``: see
    :func:`gram_and_valid`."""
    K, valid = gram_and_valid(stack, **sketch)
    return _distances_from_gram(K), K, valid


def _combine(w: jax.Array, stack: jax.Array) -> jax.Array:
    return jnp.dot(w.astype(stack.dtype), stack, precision=_HIGH)


def krum_scores(D: jax.Array, f: int, *, neighbours: int | None = None, squared: bool = True) -> jax.Array:
    """Krum scores from squared distances D (p, p): the sum of each row's ``neighbours`` smallest
    distances to the others (default p - f - 2, Blanchard et al. 2017); non-squared if not ``squared``."""
    p = D.shape[0]
    k = p - f - 2 if neighbours is None else neighbours
    k = max(1, min(k, p - 1))
    Dm = D if squared else jnp.sqrt(D)
    Dm = Dm.at[jnp.diag_indices(p)].set(jnp.inf)
    return jnp.sum(jnp.sort(Dm, axis=1)[:, :k], axis=1)


def krum(
    stack, *, f: int, key=None, neighbours: int | None = None, squared: bool = True, sketch: int = 0, sketch_seed=None
):
    """Krum (Blanchard et al., NeurIPS 2017): the worker with the smallest sum of squared distances to
    its p - f - 2 nearest others; requires p >= 2f + 3. (p, d) -> (d,).

    ``neighbours`` overrides p - f - 2 (ByzFL uses p - f - 1); ``squared=False`` uses plain distances.
    ``sketch``/``sketch_seed``: a sketched Gram matrix (:func:`gram_and_valid`).
    """
    D, _, valid = pairwise_sq_distances(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    i = jnp.argmin(krum_scores(D, f, neighbours=neighbours, squared=squared))
    return combine(jax.nn.one_hot(i, stack.shape[0], dtype=stack.dtype), stack, valid)


def multi_krum(
    stack,
    *,
    f: int,
    key=None,
    m: int | None = None,
    neighbours: int | None = None,
    squared: bool = True,
    sketch: int = 0,
    sketch_seed=None,
):
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): the mean of the m workers with the
    lowest Krum scores (default m = p - f); requires p >= 2f + 3. (p, d) -> (d,).

    The FA authors' released Multi-Krum scores with non-squared distances: ``squared=False``.
    ``neighbours`` overrides p - f - 2 (ByzFL: p - f - 1). ``sketch``/``sketch_seed``: a sketched
    Gram matrix (:func:`gram_and_valid`).
    """
    p = stack.shape[0]
    m = p - f if m is None else m
    if not 1 <= m <= p:
        raise ValueError(f"m must satisfy 1 <= m <= p = {p}; got m = {m}")
    D, _, valid = pairwise_sq_distances(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    _, idx = lax.top_k(-krum_scores(D, f, neighbours=neighbours, squared=squared), m)
    w = jnp.zeros((p,), stack.dtype).at[idx].set(1.0 / m)
    return combine(w, stack, valid)


def bulyan(stack, *, f: int, key=None, squared: bool = True, sketch: int = 0, sketch_seed=None):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018); requires p >= 4f + 3. (p, d) -> (d,).

    1. Select theta = p - 2f workers by repeatedly taking the Krum winner of the remaining set (Krum
       with n_t - f - 2 neighbours, at least 1).
    2. Per coordinate, average the beta = theta - 2f selected values closest to their median.

    The FA authors' released Bulyan differs in its selection step (it does not re-run Krum on the
    shrinking set); this is the paper's definition. ``sketch``/``sketch_seed`` sketch the Gram matrix
    of the selection step (:func:`gram_and_valid`); the coordinatewise step stays exact.
    """
    p = stack.shape[0]
    theta = p - 2 * f
    beta = theta - 2 * f
    D, _, valid = pairwise_sq_distances(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    Dm = D if squared else jnp.sqrt(D)
    removed = jnp.zeros((p,), bool)
    chosen = []
    for t in range(theta):
        k = max(1, (p - t) - f - 2)
        mask = removed[:, None] | removed[None, :] | jnp.eye(p, dtype=bool)
        rows = jnp.sort(jnp.where(mask, jnp.inf, Dm), axis=1)[:, :k]
        score = jnp.where(removed, jnp.inf, jnp.sum(rows, axis=1))
        i = jnp.argmin(score)
        chosen.append(i)
        removed = removed.at[i].set(True)
    chosen = jnp.stack(chosen)
    sel = jnp.where(valid[chosen][:, None], stack[chosen], 0)
    rows = sorted_rows(sel)
    med = rows[theta // 2] if theta % 2 else (rows[theta // 2 - 1] + rows[theta // 2]) / 2
    return closest_window_mean(rows, med, beta)


class GeomedInfo(NamedTuple):
    """Diagnostics of :func:`geomed_with_info`: coefficients c (aggregate = c @ stack), steps, converged."""

    coefficients: jax.Array
    num_steps: jax.Array
    converged: jax.Array


def geomed_with_info(
    stack,
    *,
    f: int = 0,
    key=None,
    nu=1e-6,
    tol=1e-6,
    max_iters: int = 200,
    init: str = "mean",
    sketch: int = 0,
    sketch_seed=None,
):
    """Geometric median argmin_z sum_i ||g_i - z|| by smoothed Weiszfeld (RFA, Pillutla et al. 2022).

    z <- sum_i w_i g_i / sum_i w_i with w_i = 1 / max(||g_i - z||, nu), from ``init`` ("mean" or
    "zero", ByzFL's start), until the relative change ||z_t - z_{t-1}|| / ||z_t|| < tol or
    ``max_iters`` (a static trip count: later iterations leave the converged z as it is). z stays a
    combination c @ stack, so iterations run in the p x p Gram space.
    Breakdown point 1/2. ``sketch``/``sketch_seed``: a sketched Gram matrix (:func:`gram_and_valid`).
    Returns ((d,) aggregate, :class:`GeomedInfo`).
    """
    del f
    if init not in ("mean", "zero"):
        raise ValueError(f"init must be 'mean' or 'zero'; got {init!r}")
    p = stack.shape[0]
    K, valid = gram_and_valid(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    dtype = K.dtype
    n2 = jnp.diagonal(K)
    nu = jnp.asarray(nu, dtype)
    tol = jnp.asarray(tol, dtype)
    c0 = jnp.full((p,), 1.0 / p if init == "mean" else 0.0, dtype)

    def dist(c):
        Kc = K @ c
        return jnp.sqrt(jnp.maximum(n2 - 2 * Kc + c @ Kc, 0))

    def step(c):
        w = 1 / jnp.maximum(dist(c), nu)
        return w / jnp.sum(w)

    def body(_, st):
        c, i, done = st
        c_new = step(c)
        dc = c_new - c
        change = jnp.sqrt(jnp.maximum(dc @ K @ dc, 0))
        size = jnp.sqrt(jnp.maximum(c_new @ K @ c_new, 0))
        new = (c_new, i + 1, change <= tol * jnp.maximum(size, jnp.finfo(dtype).tiny))
        return jax.tree.map(lambda old, nw: jnp.where(done, old, nw), st, new)

    # a static trip count with the converged state frozen (the numbers of a loop that stops there): no
    # predicate goes to the host on an accelerator, and the rule is reverse-differentiable (autodiff attack)
    c, steps, done = lax.fori_loop(0, max_iters, body, (c0, jnp.int32(0), jnp.array(False)))
    return combine(c, stack, valid), GeomedInfo(c, steps, done)


def geomed(stack, **kwargs):
    """Geometric median (smoothed Weiszfeld); see :func:`geomed_with_info`. (p, d) -> (d,)."""
    return geomed_with_info(stack, **kwargs)[0]


def centered_clipping(stack, *, f: int = 0, key=None, center=None, tau=100.0, iters: int = 1):
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021): v <- v + (1/p) sum_i clip_tau(g_i - v),
    ``iters`` times from ``center`` (a (d,) vector; default zeros, as ByzFL). With
    ``center="previous"`` the registered rule is stateful: its state (:class:`CenterState`) holds the
    previous round's aggregate, which centres the next round, as Karimireddy et al. run it (zeros before
    the first round). clip_tau(u) = u * min(1, tau / ||u||). (p, d) -> (d,).

    v stays alpha * center + c @ stack. Few iterations (<= 2) run in d-space (two passes over the
    stack each); more run in Gram space (one Gram product, then O(p^2) per iteration).
    """
    del f, key
    p, d = stack.shape
    work = _work(stack)
    dtype = work.dtype
    tau = jnp.asarray(tau, dtype)
    tiny = jnp.finfo(dtype).tiny
    v0 = jnp.zeros((d,), dtype) if center is None else jnp.asarray(center, dtype).reshape(d)
    if iters <= 2:
        n2 = jnp.einsum("pd,pd->p", work, work, precision=_HIGH)
        valid = jnp.isfinite(n2)
        n2 = jnp.where(valid, n2, 0)
        v = v0
        for _ in range(iters):
            d2 = n2 - 2 * masked_matvec(work, v, valid) + jnp.dot(v, v, precision=_HIGH)
            s = jnp.minimum(1, tau / jnp.maximum(jnp.sqrt(jnp.maximum(d2, 0)), tiny))
            v = v * (1 - jnp.mean(s)) + combine(s / p, work, valid)
        return v.astype(stack.dtype)
    K, valid = gram_and_valid(work)
    n2 = jnp.diagonal(K)
    if center is None:
        gv, vv = jnp.zeros((p,), dtype), jnp.zeros((), dtype)
    else:
        gv = masked_matvec(work, v0, valid)
        vv = jnp.dot(v0, v0, precision=_HIGH)

    def body(_, st):
        alpha, c = st
        Kc = K @ c
        d2 = n2 + alpha**2 * vv + c @ Kc - 2 * alpha * gv - 2 * Kc + 2 * alpha * (c @ gv)
        s = jnp.minimum(1, tau / jnp.maximum(jnp.sqrt(jnp.maximum(d2, 0)), tiny))
        sbar = jnp.mean(s)
        return alpha * (1 - sbar), c * (1 - sbar) + s / p

    alpha, c = lax.fori_loop(0, iters, body, (jnp.ones((), dtype), jnp.zeros((p,), dtype)))
    return (alpha * v0 + combine(c, work, valid)).astype(stack.dtype)


def subsets(p: int, k: int, *, max_subsets: int, rule: str) -> np.ndarray:
    """All k-subsets of range(p) as an (S, k) int array; ``ValueError`` if S > max_subsets."""
    count = math.comb(p, k)
    if count > max_subsets:
        raise ValueError(
            f"{rule} enumerates C(p={p}, {k}) = {count} subsets, more than max_subsets={max_subsets}; "
            f"its cost is O(C(p, f) * p^2) after the Gram product. Use a smaller p or f, or raise "
            f"max_subsets if you mean it."
        )
    return np.array(list(itertools.combinations(range(p), k)), dtype=np.int32).reshape(count, k)


def mda(stack, *, f: int, key=None, max_subsets: int = 200_000, sketch: int = 0, sketch_seed=None):
    """Minimum-diameter averaging (El Mhamdi et al. 2018; Rousseeuw's MVE idea): the mean of the
    (p - f)-subset with the smallest diameter max_{i,j in S} ||g_i - g_j||; requires p > 2f.
    Cost: C(p, f) subsets (refused above ``max_subsets``). ``sketch``/``sketch_seed``: a sketched
    Gram matrix (:func:`gram_and_valid`). (p, d) -> (d,)."""
    p = stack.shape[0]
    k = p - f
    idx = jnp.asarray(subsets(p, k, max_subsets=max_subsets, rule="mda"))
    D, _, valid = pairwise_sq_distances(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    diam = lax.map(lambda s: jnp.max(D[s][:, s]), idx, batch_size=1024)
    best = idx[jnp.argmin(diam)]
    w = jnp.zeros((p,), stack.dtype).at[best].set(1.0 / k)
    return combine(w, stack, valid)


def monna(stack, *, f: int, key=None, idx: int = 0):
    """MoNNA (Farhadkhani et al. 2023): the mean of the p - f nearest neighbours (itself included) of
    a trusted worker ``idx`` (default 0); requires p > 2f. (p, d) -> (d,)."""
    del key
    p = stack.shape[0]
    if not 0 <= idx < p:
        raise ValueError(f"idx must satisfy 0 <= idx < p = {p}; got {idx}")
    work = _work(stack)  # distances to one row only: two passes, no Gram product
    n2 = jnp.einsum("pd,pd->p", work, work, precision=_HIGH)
    valid = jnp.isfinite(n2)
    n2 = jnp.where(valid, n2, 0)
    anchor = jnp.where(valid[idx], work[idx], 0)
    dots = masked_matvec(work, anchor, valid)
    d2 = n2 - 2 * dots + n2[idx]
    d2 = jnp.where(jnp.isnan(d2), jnp.inf, d2).at[idx].set(-1.0)  # itself first
    _, nn = lax.top_k(-d2, p - f)
    w = jnp.zeros((p,), stack.dtype).at[nn].set(1.0 / (p - f))
    return combine(w, stack, valid)


_half = lambda p: (p - 1) // 2
_krum_max = lambda p: max((p - 3) // 2, 0)
_KRUM_STATIC = ("neighbours", "squared")
register(Rule("krum", krum, _krum_max, "p >= 2f + 3", sanitize=False, sketchable=True, static_hparams=_KRUM_STATIC))
register(
    Rule(
        "multi_krum",
        multi_krum,
        _krum_max,
        "p >= 2f + 3",
        sanitize=False,
        sketchable=True,
        static_hparams=("m", *_KRUM_STATIC),
    )
)
register(
    Rule(
        "bulyan",
        bulyan,
        lambda p: max((p - 3) // 4, 0),
        "p >= 4f + 3",
        sanitize=False,
        sketchable=True,
        static_hparams=("squared",),
    )
)
register(Rule("geomed", geomed, _half, "p > 2f", sanitize=False, sketchable=True, static_hparams=("max_iters", "init")))


class CenterState(NamedTuple):
    """State of centered clipping centred on its previous aggregate: ``center`` (d,) float32."""

    center: jax.Array


def is_previous(center) -> bool:
    """Whether ``center`` is the string "previous" (an array center is compared by identity, never elementwise)."""
    return isinstance(center, str) and center == "previous"


def _cc_init(example, *, center=None, **hparams):
    """CenterState(zeros (d,)) for ``center="previous"`` (``example``: the (p, d) stack); ``()``
    (stateless) otherwise."""
    del hparams
    if is_previous(center):
        return CenterState(jnp.zeros(example.shape[-1:], jnp.float32))
    return ()


def _cc_update(stack, state, *, f, key, center=None, **hparams):
    if isinstance(state, CenterState):
        agg = centered_clipping(stack, f=f, key=key, center=state.center, **hparams)
        return agg, CenterState(agg.astype(jnp.float32)), {}
    if isinstance(center, str):
        raise ValueError(f"center must be 'previous' or a (d,) array; got {center!r}")
    return centered_clipping(stack, f=f, key=key, center=center, **hparams), state, {}


register(
    Rule(
        "centered_clipping",
        centered_clipping,
        _half,
        "p > 2f",
        sanitize=False,
        init=_cc_init,
        update=_cc_update,
        static_hparams=("center", "iters"),
    )
)
register(Rule("mda", mda, _half, "p > 2f", sanitize=False, sketchable=True, static_hparams=("max_subsets",)))
register(Rule("monna", monna, _half, "p > 2f", sanitize=False, static_hparams=("idx",)))
