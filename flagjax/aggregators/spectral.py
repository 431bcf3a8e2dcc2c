"""Spectral and filtering rules: CAF, SMEA, DnC, SignGuard.

CAF and SMEA need top eigenvalues of (weighted) covariance matrices of the workers; the non-zero
spectrum of sum_i c_i (g_i - mu)(g_i - mu)^T equals that of a p x p matrix built from the Gram
matrix, so both run exactly in Gram space (ByzFL approximates them with one power iteration from a
random vector; the parity tests use inputs where both pick the same workers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flagjax import solver
from flagjax.aggregators.distance import _combine, _work, combine, gram_and_valid, subsets
from flagjax.aggregators.registry import Rule, register

__all__ = ["caf", "smea", "dnc", "signguard"]


@jax.custom_jvp
def _top_eigpair(S: jax.Array):
    """Largest eigenvalue and a unit eigenvector of a symmetric (p, p) S: ((), (p,)).

    Its derivative (custom JVP) is first-order perturbation theory for the top pair alone:
    d lam = u^T dS u, du = sum_{j: mu_j < lam} u_j (u_j^T dS u) / (lam - mu_j). ``jnp.linalg.eigh``'s own
    rule divides by every pairwise eigen-gap, so repeated eigenvalues below the top (a zero-weighted
    worker's zero row, as CAF makes them) turn the gradient into NaN although the top pair is smooth
    there. Directions whose gap to the top is at rounding level (a tie at the top, where u is not a
    function of S) get no derivative."""
    ev, U = jnp.linalg.eigh(S)
    return ev[-1], U[:, -1]


@_top_eigpair.defjvp
def _top_eigpair_jvp(primals, tangents):
    (S,), (dS,) = primals, tangents
    ev, U = jnp.linalg.eigh(S)
    lam, u = ev[-1], U[:, -1]
    hi = lax.Precision.HIGHEST
    dSu = jnp.dot(dS, u, precision=hi)
    gap = lam - ev
    apart = gap > 16 * jnp.finfo(S.dtype).eps * jnp.maximum(jnp.abs(lam), jnp.finfo(S.dtype).tiny)
    coef = jnp.where(apart, jnp.dot(U.T, dSu, precision=hi) / jnp.where(apart, gap, 1), 0)
    return (lam, u), (jnp.dot(u, dSu, precision=hi), jnp.dot(U, coef, precision=hi))


def _weighted_top_eig(K: jax.Array, c: jax.Array):
    """Top eigenpair of sum_i c_i z_i z_i^T / sum(c), z_i = g_i - mu_c, in Gram space.

    Returns (eigenvalue, t) where t_i = <z_i, v> for the unit top eigenvector v, and mu_c's
    coefficients w = c / sum(c)."""
    p = K.shape[0]
    csum = jnp.maximum(jnp.sum(c), jnp.finfo(K.dtype).tiny)
    w = c / csum
    A = jnp.eye(p, dtype=K.dtype) - w[None, :]  # Z = G^T A^T: z_i = g_i - sum_j w_j g_j
    Kz = A @ K @ A.T  # Gram of the z_i
    pos = c > 0  # sqrt's derivative is infinite at 0: a zero-weighted worker would make the gradient NaN
    sc = jnp.where(pos, jnp.sqrt(jnp.where(pos, c, 1) / csum), 0)
    S = sc[:, None] * Kz * sc[None, :]
    S = (S + S.T) / 2
    lam, u = _top_eigpair(S)
    # v = sum_i sc_i u_i z_i / sqrt(lam); <z_j, v> = (Kz (sc * u))_j / sqrt(lam)
    t = Kz @ (sc * u) / jnp.sqrt(jnp.maximum(lam, jnp.finfo(K.dtype).tiny))
    return lam, t, w


def caf(stack, *, f: int, key=None, sketch: int = 0, sketch_seed=None):
    """Covariance-aware filtering (CAF; Allouah et al., as in ByzFL): start with weights c = 1; while
    sum(c) > p - 2f (at most 2p rounds: a static trip count, so the rule is reverse-differentiable),
    take the top eigenvector v of the c-weighted covariance, score tau_i = <g_i - mu_c, v>^2 and
    downweight c_i <- c_i (1 - tau_i / max tau). Returns the weighted mean mu_c with the smallest top
    eigenvalue seen. Exact eigenvectors in Gram space (ByzFL uses one power iteration). Requires
    p > 2f. ``sketch``/``sketch_seed``: a sketched Gram matrix
    (:func:`flagjax.aggregators.distance.gram_and_valid`). (p, d) -> (d,)."""
    p = stack.shape[0]
    K, valid = gram_and_valid(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    dtype = K.dtype

    def body(st):
        c, best_val, best_w = st
        lam, t, w = _weighted_top_eig(K, c)
        better = lam < best_val
        best_val = jnp.where(better, lam, best_val)
        best_w = jnp.where(better, w, best_w)
        tau = t * t
        # clip: a fused x * (1 / max) can give 1 - tau/max = -1 ulp, and sqrt(c) would be NaN
        c = c * jnp.maximum(1 - tau / jnp.maximum(jnp.max(tau), jnp.finfo(dtype).tiny), 0)
        return c, best_val, best_w

    def step(_, st):
        # at most 2p filtering rounds, while sum(c) > p - 2f: a static trip count (so the rule can be
        # reverse-differentiated, and no predicate goes to an accelerator's host) whose later rounds leave
        # the state as it is, the numbers of a loop that stops there. On CPU a cond skips those rounds'
        # eigh; elsewhere they run and a select keeps the old state.
        active = jnp.sum(st[0]) > p - 2 * f
        skip = lambda s: lax.cond(active, body, lambda s: s, s)  # noqa: E731
        freeze = lambda s: jax.tree.map(lambda old, nw: jnp.where(active, nw, old), s, body(s))  # noqa: E731
        return lax.platform_dependent(st, cpu=skip, default=freeze)

    c0 = jnp.ones((p,), dtype)
    _, _, w = lax.fori_loop(0, 2 * p, step, (c0, jnp.asarray(jnp.inf, dtype), c0 / p))
    return combine(w, stack, valid)


def smea(stack, *, f: int, key=None, max_subsets: int = 200_000, sketch: int = 0, sketch_seed=None):
    """Smallest maximum eigenvalue averaging (SMEA; Allouah et al. 2024): the mean of the
    (p - f)-subset whose empirical covariance has the smallest top eigenvalue. Exact, in Gram space
    (the centered Gram of each subset); C(p, f) subsets, refused above ``max_subsets``.
    Requires p > 2f. ``sketch``/``sketch_seed``: a sketched Gram matrix
    (:func:`flagjax.aggregators.distance.gram_and_valid`). (p, d) -> (d,)."""
    p = stack.shape[0]
    k = p - f
    idx = jnp.asarray(subsets(p, k, max_subsets=max_subsets, rule="smea"))
    K, valid = gram_and_valid(stack, sketch=sketch, sketch_seed=sketch_seed, key=key)
    H = jnp.eye(k, dtype=K.dtype) - 1.0 / k

    def top(s):
        Ks = K[s][:, s]
        return jnp.linalg.eigvalsh(H @ Ks @ H)[-1]

    vals = lax.map(top, idx, batch_size=512)
    best = idx[jnp.argmin(vals)]
    w = jnp.zeros((p,), stack.dtype).at[best].set(1.0 / k)
    return combine(w, stack, valid)


def dnc(stack, *, f: int, key, num_iters: int = 5, sub_dim: int = 10_000, c: float = 1.0):
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021). Each of ``num_iters`` rounds draws
    ``sub_dim`` coordinates (with replacement; the paper samples without), centres the sub-gradients,
    scores s_i = <g_i - mu, v>^2 with v their top right singular vector, and keeps all but the
    ``c * f`` highest scores; the output is the mean of workers kept in every round. Requires p > 2f.
    (p, d) -> (d,)."""
    p, d = stack.shape
    b = min(sub_dim, d)
    n_remove = min(int(c * f), p - 1)
    good = jnp.ones((p,), bool)
    for key_i in jax.random.split(key, num_iters):
        cols = jax.random.randint(key_i, (b,), 0, d)
        sub = _work(stack[:, cols])
        K = solver.gram_matrix(sub)
        lam, t, _ = _weighted_top_eig(K, jnp.ones((p,), K.dtype))
        scores = t * t
        if n_remove:
            _, worst = lax.top_k(scores, n_remove)
            good = good.at[worst].set(False)
    w = good.astype(stack.dtype) / jnp.maximum(jnp.sum(good), 1)
    return _combine(w, stack)


def signguard(stack, *, f: int = 0, key, low=0.1, high=3.0, coord_frac=0.1, bandwidth=None, shift_iters: int = 20):
    """SignGuard (Xu et al., ICDCS 2022), with mean-shift clustering done in p-space.

    1. Norm filter: keep workers with low <= ||g_i|| / median_j ||g_j|| <= high.
    2. Sign filter: on a random ``coord_frac`` of coordinates, each worker's features are the fractions
       of positive, zero and negative entries; flat-kernel mean shift (``shift_iters`` steps,
       ``bandwidth`` default: the median pairwise feature distance) finds modes, and the workers in
       the most populated mode are kept.
    3. Output: the mean of the kept gradients, each clipped to the median norm.
    The original clusters with scikit-learn's MeanShift; modes here are merged within bandwidth / 2.
    (p, d) -> (d,).
    """
    p, d = stack.shape
    work = _work(stack)
    norms = jnp.sqrt(jnp.einsum("pd,pd->p", work, work, precision=lax.Precision.HIGHEST))
    med = jnp.median(norms)
    ratio = norms / jnp.maximum(med, jnp.finfo(work.dtype).tiny)
    keep_norm = (ratio >= low) & (ratio <= high)
    b = max(1, int(coord_frac * d))
    cols = jax.random.randint(key, (b,), 0, d)
    sub = work[:, cols]
    feats = jnp.stack([jnp.mean(sub > 0, 1), jnp.mean(sub == 0, 1), jnp.mean(sub < 0, 1)], axis=1)
    fd = jnp.sqrt(jnp.sum((feats[:, None] - feats[None]) ** 2, -1))
    bw = jnp.median(fd) if bandwidth is None else jnp.asarray(bandwidth, work.dtype)
    bw = jnp.maximum(bw, 1e-6)

    def shift(_, x):
        near = (jnp.sqrt(jnp.sum((x[:, None] - feats[None]) ** 2, -1)) <= bw).astype(x.dtype)
        return near @ feats / jnp.maximum(near.sum(1, keepdims=True), 1)

    modes = lax.fori_loop(0, shift_iters, shift, feats)
    same = jnp.sqrt(jnp.sum((modes[:, None] - modes[None]) ** 2, -1)) <= bw / 2
    counts = jnp.sum(same & keep_norm[None, :], axis=1)
    counts = jnp.where(keep_norm, counts, -1)
    keep = same[jnp.argmax(counts)] & keep_norm
    scale = jnp.minimum(1, med / jnp.maximum(norms, jnp.finfo(work.dtype).tiny))
    w = jnp.where(keep, scale, 0) / jnp.maximum(jnp.sum(keep), 1)
    return _combine(w, stack)


_half = lambda p: (p - 1) // 2
register(Rule("caf", caf, _half, "p > 2f", sanitize=False, sketchable=True))
register(Rule("smea", smea, _half, "p > 2f", sanitize=False, sketchable=True, static_hparams=("max_subsets",)))
register(Rule("dnc", dnc, _half, "p > 2f", needs_key=True, static_hparams=("num_iters", "sub_dim", "c")))
register(Rule("signguard", signguard, _half, "p > 2f", needs_key=True, static_hparams=("coord_frac", "shift_iters")))
