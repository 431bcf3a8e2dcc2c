"""Byzantine attacks: functions that craft the f Byzantine rows from the round's honest gradients.

Omniscient threat model: an attack sees the honest (h, d) stack of the round and an explicit PRNG key
(never a global seed) and returns an (f, d) stack. :func:`attack` is the front door; :func:`names`
lists the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Attack", "attack", "names", "get", "register"]


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


for _name, _fn in [
    ("random", _random),
    ("gaussian", _gaussian),
    ("reverse", _reverse),
    ("signflip", _signflip),
    ("collude", _collude),
]:
    register(Attack(_name, _fn))
