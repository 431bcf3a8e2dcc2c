"""Reverse-mode derivatives of the spectral rules (CAF, DnC): finite where the forward pass is smooth, equal
to central finite differences in float64, and CAF's static-trip-count loop gives the numbers of the loop
that stops when sum(c) <= p - 2f (a NumPy reference of Allouah et al.'s filter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax


def _stack(p, d, f, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(1, d)) + rng.normal(size=(p, d))
    g[:f] *= -4.0
    return jnp.asarray(g, dtype)


def _caf_numpy(g, f):
    """CAF with a plain while loop and NumPy's eigh on the d x d weighted covariance (float64)."""
    g = np.asarray(g, np.float64)
    p = g.shape[0]
    c = np.ones(p)
    best_val, best_w = np.inf, c / p
    i = 0
    while c.sum() > p - 2 * f and i < 2 * p:
        w = c / c.sum()
        mu = w @ g
        z = g - mu
        cov = (z * w[:, None]).T @ z
        ev, V = np.linalg.eigh(cov)
        if ev[-1] < best_val:
            best_val, best_w = ev[-1], w
        tau = (z @ V[:, -1]) ** 2
        c = c * np.maximum(1 - tau / tau.max(), 0)
        i += 1
    return best_w @ g


@pytest.mark.parametrize("p,f", [(5, 1), (9, 4), (15, 3), (15, 7)])
def test_caf_matches_a_numpy_while_loop(x64, p, f):
    g = _stack(p, 12, f, seed=p + f, dtype=jnp.float64)
    ref = _caf_numpy(g, f)
    np.testing.assert_allclose(np.asarray(flagjax.aggregate("caf", g, f=f)), ref, rtol=1e-9, atol=1e-9)
    jitted = jax.jit(lambda s: flagjax.aggregate("caf", s, f=f))(g)
    np.testing.assert_allclose(np.asarray(jitted), ref, rtol=1e-9, atol=1e-9)


def _loss(rule, honest, f):
    def loss(byz):
        out = flagjax.aggregate(rule, jnp.concatenate([byz, honest]), f=f, key=jax.random.key(0))
        return jnp.sum((out - jnp.mean(honest, axis=0)) ** 2)

    return loss


@pytest.mark.parametrize("rule,scale", [("caf", -4.0), ("dnc", 0.3)])
def test_spectral_rule_gradient_matches_finite_differences(x64, rule, scale):
    """CAF zeroes workers' weights as it filters (repeated zero eigenvalues, sqrt at 0): eigh's own
    derivative and sqrt's are NaN there; the top pair's perturbation rule keeps it finite and right.
    DnC's output moves only with the rows it keeps: its Byzantine rows here sit near the honest mean
    (``scale`` times an honest row's deviation), so that it keeps them."""
    f = 3
    honest = _stack(12, 10, 0, seed=4, dtype=jnp.float64)[f:]
    m = jnp.mean(honest, axis=0)
    byz = m + scale * (honest[:f] - m)
    loss = _loss(rule, honest, f)
    grad = np.asarray(jax.grad(loss)(byz))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    rng = np.random.default_rng(0)
    for _ in range(4):
        v = rng.normal(size=byz.shape)
        h = 1e-6
        fd = (loss(byz + h * v) - loss(byz - h * v)) / (2 * h)
        np.testing.assert_allclose(float(np.sum(grad * v)), float(fd), rtol=1e-4, atol=1e-8)


def test_caf_gradient_is_finite_in_float32_and_under_jit_and_vmap():
    f = 3
    gs = jnp.stack([_stack(15, 40, f, seed=s) for s in (1, 2)])
    one = lambda g: jax.grad(_loss("caf", g[f:], f))(g[:f])  # noqa: E731
    eager = np.stack([np.asarray(one(g)) for g in gs])
    assert np.all(np.isfinite(eager))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(one))(gs)), eager, rtol=2e-4, atol=1e-6)
