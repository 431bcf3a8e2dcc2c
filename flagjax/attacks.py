"""Byzantine attacks: functions that craft the f Byzantine rows from the round's honest gradients.

Omniscient threat model: an attack sees the honest (h, d) stack of the round and an explicit PRNG key
(never a global seed) and returns an (f, d) stack. :func:`attack` is the front door; :func:`names`
lists the registry.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Attack", "attack", "names", "get", "register", "alie_z"]


@dataclasses.dataclass(frozen=True)
class Attack:
    """A registered attack: ``fn(honest (h, d), *, f, key, **hp) -> (f, d)``."""

    name: str
    fn: Callable[..., jax.Array]


_REGISTRY: dict[str, Attack] = {}


def register(atk: Attack) -> Attack:
    """Add ``atk`` to the registry (a new name only) and return it."""
    if atk.name in _REGISTRY:
        raise ValueError(f"attack {atk.name!r} is already registered")
    _REGISTRY[atk.name] = atk
    return atk


def names() -> tuple[str, ...]:
    """Names of all registered attacks, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Attack:
    """The :class:`Attack` called ``name``; ``KeyError`` naming the known attacks otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown attack name={name!r}; known attacks: {', '.join(names())}") from None


def attack(name: str, honest: jax.Array, *, f: int, key: jax.Array, **hparams) -> jax.Array:
    """Craft ``f`` Byzantine rows with attack ``name``.

    Args:
      name: a registered attack (see :func:`names`).
      honest: (h, d) float array, the honest gradients of the round (h >= 1).
      f: static number of Byzantine rows to produce (>= 0).
      key: PRNG key.
      **hparams: the attack's hyperparameters (see its docstring).

    Returns:
      (f, d) array of the honest dtype.
    """
    atk = get(name)
    honest = jnp.asarray(honest)
    if honest.ndim != 2 or honest.shape[0] < 1:
        raise ValueError(f"honest must be an (h, d) array with h >= 1; got shape {honest.shape}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be a non-negative Python int; got {f!r}")
    if key is None:
        raise ValueError("key must be a PRNG key (jax.random.key(seed)); attacks never use a global seed")
    out = atk.fn(honest, f=f, key=key, **hparams)
    return jnp.asarray(out, honest.dtype).reshape(f, honest.shape[1])


def _mean(honest):
    h = honest.shape[0]
    return jnp.dot(jnp.full((h,), 1.0 / h, honest.dtype), honest, precision=lax.Precision.HIGHEST)


def _random(honest, *, f, key, low=0.0, high=1.0):
    """Uniform noise U[low, high) per coordinate (the paper's "random" attack: U[0, 1))."""
    return jax.random.uniform(key, (f, honest.shape[1]), honest.dtype, low, high)


def _gaussian(honest, *, f, key, scale=200.0):
    """Gaussian noise N(0, scale^2) per coordinate (ByzFL/Garfield's "gaussian")."""
    return scale * jax.random.normal(key, (f, honest.shape[1]), honest.dtype)


def _reverse(honest, *, f, key, factor=-10.0):
    """factor * g_j of a random honest worker j per Byzantine row (the paper's "reversed", x -10)."""
    idx = jax.random.randint(key, (f,), 0, honest.shape[0])
    return factor * honest[idx]


def _signflip(honest, *, f, key):
    """-(honest mean): every Byzantine row sends the negated honest mean."""
    del key
    return jnp.broadcast_to(-_mean(honest), (f, honest.shape[1]))


def _collude(honest, *, f, key, scale=100.0):
    """All f rows send the same random vector N(0, scale^2 I): a colluding cluster."""
    v = scale * jax.random.normal(key, (honest.shape[1],), honest.dtype)
    return jnp.broadcast_to(v, (f, honest.shape[1]))


def _drop(honest, *, f, key, fraction=0.1):
    """Coordinate drop: each Byzantine row is a random honest worker's gradient with a random
    ``fraction`` of its coordinates zeroed (the paper's "dropped coordinates" workers; the released
    code's version of this attack is a no-op by a bug)."""
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (f,), 0, honest.shape[0])
    keep = jax.random.uniform(k2, (f, honest.shape[1])) >= fraction
    return jnp.where(keep, honest[idx], 0)


def alie_z(p: int, f: int) -> float:
    """Baruch et al. (2019): s = floor(p/2 + 1) - f, z = Phi^-1((p - s) / p)."""
    s = math.floor(p / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((p - s) / p)


def _std(honest):
    m = _mean(honest)
    return m, jnp.sqrt(jnp.maximum(_mean(honest * honest) - m * m, 0))


def _alie(honest, *, f, key, z=None):
    """A little is enough (Baruch, Baruch, Goldberg, NeurIPS 2019): every Byzantine row is
    mu - z * sigma (coordinate-wise mean and standard deviation of the honest rows), with z from the
    normal quantile for p = h + f workers (see :func:`alie_z`) unless given."""
    del key
    h = honest.shape[0]
    z = alie_z(h + f, f) if z is None else z
    m, sd = _std(honest)
    return jnp.broadcast_to(m - z * sd, (f, honest.shape[1]))


def _ipm(honest, *, f, key, eps=0.1):
    """Inner-product manipulation / fall of empires (Xie, Koyejo, Gupta, UAI 2019): -eps * mean."""
    del key
    return jnp.broadcast_to(-eps * _mean(honest), (f, honest.shape[1]))


def _mimic(honest, *, f, key, target=0):
    """Mimic (Karimireddy, He, Jaggi, ICLR 2022): every Byzantine row copies honest worker ``target``."""
    del key
    return jnp.broadcast_to(honest[target], (f, honest.shape[1]))


def _inf(honest, *, f, key):
    """Rows of +inf."""
    del key
    return jnp.full((f, honest.shape[1]), jnp.inf, honest.dtype)


def _nan(honest, *, f, key):
    """Rows of NaN."""
    del key
    return jnp.full((f, honest.shape[1]), jnp.nan, honest.dtype)


def _damage(rule, rule_hparams, honest, byz_row, f, key):
    """||rule(honest + f copies of byz_row) - mean(honest)||, the quantity the optimal attacks maximise."""
    from flagjax import aggregators  # attacks sit beside aggregators; imported lazily

    stack = jnp.concatenate([honest, jnp.broadcast_to(byz_row, (f, honest.shape[1]))])
    out = aggregators.aggregate(rule, stack, f=f, key=key, **dict(rule_hparams or {}))
    return jnp.linalg.norm(out - _mean(honest))


def _line_search(make_row, honest, f, key, rule, rule_hparams, factors):
    factors = jnp.asarray(factors, honest.dtype)
    dmg = jax.vmap(lambda t: _damage(rule, rule_hparams, honest, make_row(t), f, key))(factors)
    dmg = jnp.where(jnp.isfinite(dmg), dmg, -jnp.inf)
    return factors[jnp.argmax(dmg)]


_DEFAULT_FACTORS = tuple(float(x) for x in np.concatenate([[0.0], np.geomspace(0.05, 100.0, 31)]))


def _optimal_alie(honest, *, f, key, rule="mean", rule_hparams=None, factors=_DEFAULT_FACTORS):
    """ALIE with the factor z chosen to maximise ||rule(stack) - honest mean|| over ``factors``
    (a vectorised line search, like ByzFL's Optimal_ALittleIsEnough). ``rule`` is the defence's
    name (composed specs such as "nnm+krum" work) and ``rule_hparams`` its hyperparameters."""
    if f == 0:
        return jnp.zeros((0, honest.shape[1]), honest.dtype)
    m, sd = _std(honest)
    z = _line_search(lambda t: m - t * sd, honest, f, key, rule, rule_hparams, factors)
    return jnp.broadcast_to(m - z * sd, (f, honest.shape[1]))


def _optimal_ipm(honest, *, f, key, rule="mean", rule_hparams=None, factors=_DEFAULT_FACTORS):
    """IPM with eps chosen to maximise ||rule(stack) - honest mean|| over ``factors`` (ByzFL's
    Optimal_InnerProductManipulation)."""
    if f == 0:
        return jnp.zeros((0, honest.shape[1]), honest.dtype)
    m = _mean(honest)
    e = _line_search(lambda t: -t * m, honest, f, key, rule, rule_hparams, factors)
    return jnp.broadcast_to(-e * m, (f, honest.shape[1]))


def _perturbation(honest, kind):
    m, sd = _std(honest)
    if kind == "std":
        return m, -sd
    if kind == "sign":
        return m, -jnp.sign(m)
    if kind == "unit":
        return m, -m / jnp.maximum(jnp.linalg.norm(m), jnp.finfo(m.dtype).tiny)
    raise ValueError(f"perturbation must be 'std', 'sign' or 'unit'; got {kind!r}")


def _min_max_sum(honest, f, perturbation, kind, iters):
    """Largest gamma (bisection) with the malicious m + gamma * u inside the honest spread."""
    m, u = _perturbation(honest, perturbation)
    sq = jnp.sum(honest * honest, 1)
    K = jnp.dot(honest, honest.T, precision=lax.Precision.HIGHEST)
    D = jnp.maximum(sq[:, None] + sq[None, :] - 2 * K, 0)
    # distances of x = m + g u to honest rows: ||m - g_i||^2 + 2 g <u, m - g_i> + g^2 ||u||^2
    hm = jnp.dot(honest, m, precision=lax.Precision.HIGHEST)
    hu = jnp.dot(honest, u, precision=lax.Precision.HIGHEST)
    a0 = jnp.sum(m * m) - 2 * hm + sq
    a1 = 2 * (jnp.dot(u, m) - hu)
    a2 = jnp.sum(u * u)
    if kind == "minmax":
        bound = jnp.max(D)
        ok = lambda g: jnp.max(a0 + a1 * g + a2 * g * g) <= bound
    else:
        bound = jnp.max(jnp.sum(D, 1))
        ok = lambda g: jnp.sum(a0 + a1 * g + a2 * g * g) <= bound
    hi = jnp.asarray(1.0, honest.dtype)
    hi = lax.while_loop(lambda h: ok(h) & (h < 1e12), lambda h: 2 * h, hi)
    lo = jnp.zeros((), honest.dtype)

    def step(_, lh):
        lo, hi = lh
        mid = (lo + hi) / 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = lax.fori_loop(0, iters, step, (lo, hi))
    return jnp.broadcast_to(m + lo * u, (f, honest.shape[1]))


def _minmax(honest, *, f, key, perturbation="std", iters=40):
    """Min-max (Shejwalkar & Houmansadr, NDSS 2021): m + gamma * u with the largest gamma such that
    the malicious row's largest distance to an honest row is at most the largest honest pairwise
    distance; u = -std (default), -sign(mean) or -unit mean."""
    del key
    return _min_max_sum(honest, f, perturbation, "minmax", iters)


def _minsum(honest, *, f, key, perturbation="std", iters=40):
    """Min-sum (Shejwalkar & Houmansadr, NDSS 2021): like min-max with the sum of squared distances to
    the honest rows bounded by the largest such sum of an honest row."""
    del key
    return _min_max_sum(honest, f, perturbation, "minsum", iters)


for _name, _fn in [
    ("random", _random),
    ("gaussian", _gaussian),
    ("reverse", _reverse),
    ("signflip", _signflip),
    ("collude", _collude),
    ("drop", _drop),
    ("alie", _alie),
    ("ipm", _ipm),
    ("mimic", _mimic),
    ("inf", _inf),
    ("nan", _nan),
    ("optimal_alie", _optimal_alie),
    ("optimal_ipm", _optimal_ipm),
    ("minmax", _minmax),
    ("minsum", _minsum),
]:
    register(Attack(_name, _fn))
