"""Reverse-mode derivatives of the coordinate-wise rules (their sorting network and sliding window have
hand-written rules for speed): equal, bit for bit, to differentiating the same computation op by op, and
to a NumPy rank reference where no values tie."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax
from flagjax.aggregators.coordinatewise import batcher_network, closest_window_mean, sorted_rows


def _op_by_op_sorted(stack):
    rows = [stack[i] for i in range(stack.shape[0])]
    for a, b in batcher_network(len(rows)):
        rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
    return rows


def _op_by_op_window(rows, center, k):
    p = len(rows)
    window = sum(rows[:k])
    best_sum, best_cost = window, jnp.maximum(center - rows[0], rows[k - 1] - center)
    for s in range(1, p - k + 1):
        window = window - rows[s - 1] + rows[s + k - 1]
        cost = jnp.maximum(center - rows[s], rows[s + k - 1] - center)
        better = cost < best_cost
        best_sum, best_cost = jnp.where(better, window, best_sum), jnp.where(better, cost, best_cost)
    return best_sum / k


def _reference(name, stack, f):
    rows = _op_by_op_sorted(stack)
    p = len(rows)
    if name == "median":
        return rows[p // 2] if p % 2 else (rows[p // 2 - 1] + rows[p // 2]) / 2
    if name == "trimmed_mean":
        return sum(rows[f : p - f]) / (p - 2 * f)
    if name == "meamed":
        med = rows[p // 2] if p % 2 else (rows[p // 2 - 1] + rows[p // 2]) / 2
        return _op_by_op_window(rows, med, p - f)
    tm = sum(rows[f : p - f]) / (p - 2 * f)  # phocas
    return _op_by_op_window(rows, tm, p - f)


def _stack(p, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(p, d)).astype(np.float32)
    x[:, :7] = np.round(x[:, :7])  # ties within columns
    x[-3:, 7:12] = x[-1, 7:12]  # identical Byzantine-like rows (ALIE's start) tie everywhere there
    x[0] = x[2]
    return jnp.asarray(x)


@pytest.mark.parametrize("p", [5, 8, 15])
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "meamed", "phocas"])
def test_gradient_equals_op_by_op(name, p):
    f = (p - 1) // 2 - 1 if p > 5 else 1
    x = _stack(p, 40, seed=p)
    w = jnp.asarray(np.random.default_rng(1).normal(size=40).astype(np.float32))
    got = jax.jit(jax.grad(lambda s: flagjax.aggregate(name, s, f=f) @ w))(x)
    # the reference runs op by op (eagerly): compiled whole, XLA:CPU takes minutes and gigabytes on it
    want = jax.grad(lambda s: _reference(name, s, f) @ w)(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the forward pass is the network's, unchanged
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda s: flagjax.aggregate(name, s, f=f))(x)), np.asarray(_reference(name, x, f))
    )


def test_trimmed_mean_gradient_against_ranks():
    # no ties: d out_j / d x_ij = 1 / (p - 2f) where x_ij's rank in column j is in [f, p - f), else 0
    p, f, d = 15, 3, 30
    x = np.random.default_rng(3).normal(size=(p, d))
    g = jax.grad(lambda s: jnp.sum(flagjax.aggregate("trimmed_mean", s, f=f)))(jnp.asarray(x, jnp.float32))
    ranks = np.argsort(np.argsort(x, axis=0), axis=0)
    want = ((ranks >= f) & (ranks < p - f)) / (p - 2 * f)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6)


@pytest.mark.parametrize(("p", "k"), [(9, 5), (130, 100)])  # 130: past int8 window indices
def test_window_gradient_goes_to_the_chosen_window_only(p, k):
    d = 20
    x = np.sort(np.random.default_rng(4).normal(size=(p, d)), axis=0).astype(np.float32)
    center = jnp.asarray(x[p // 2])
    grad = jax.grad(lambda r, c: jnp.sum(closest_window_mean(r, c, k)), argnums=(0, 1))
    g_rows, g_center = grad(jnp.asarray(x), center)
    assert not np.any(np.asarray(g_center))
    for j in range(d):  # the k values nearest the centre, each with weight 1 / k
        near = np.argsort(np.abs(x[:, j] - x[p // 2, j]), kind="stable")[:k]
        want = np.zeros(p)
        want[near] = 1 / k
        np.testing.assert_allclose(np.asarray(g_rows)[:, j], want, rtol=1e-6)


def test_gradient_under_vmap_and_list_input():
    x = jnp.stack([_stack(9, 16, seed=s) for s in range(3)])
    one = jax.grad(lambda s: jnp.sum(flagjax.aggregate("phocas", s, f=2)))
    batched = jax.jit(jax.vmap(one))(x)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(one(x[i])))
    # closest_window_mean takes sorted_rows' list or one array: the same values and derivatives
    rows_fn = lambda s: closest_window_mean(sorted_rows(s), sorted_rows(s)[4], 6)  # noqa: E731
    arr_fn = lambda s: closest_window_mean(jnp.sort(s, axis=0), jnp.sort(s, axis=0)[4], 6)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(rows_fn(x[0])), np.asarray(arr_fn(x[0])))
