"""FA's warm start (issue #15): ``warm_start=k`` starts the subspace iteration from the previous round's basis,
kept in the rule's state (FlagState), and runs k iterations there instead of the flag mean's start_iters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from flagjax import aggregators, parallel, solver, train
from flagjax.aggregators import FlagState
from tests.helpers import DS, small_config
from tests.reference import dense_flag_median, projector_distance, unit


def _stack(p=15, d=300, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=d)[None] * 2 + rng.normal(size=(p, d))


def test_zero_start_is_the_cold_start():
    """A zero state (the first round) starts from the Gaussian block: with as many iterations as the cold
    start's, the same numbers bit for bit, NaN rows included."""
    g = _stack().astype(np.float32)
    g[4] = np.nan
    g = jnp.asarray(g)
    cold, ci = aggregators.flag_with_info(g)
    warm, wi = aggregators.flag_with_info(g, warm_start=solver.START_ITERS, start=jnp.zeros((15, 8)))
    np.testing.assert_array_equal(cold, warm)
    np.testing.assert_array_equal(ci.basis, wi.basis)
    assert bool(jnp.isfinite(warm).all()) and not bool(wi.valid[4])


@pytest.mark.parametrize("p,d,r", [(7, 50, 3), (15, 300, 8)])
def test_any_start_converges_to_the_reference(x64, p, d, r):
    """With enough iterations the start does not matter: a random start, and a start with a dead (zero)
    column, give the dense float64 IRLS (tests/reference.py), as the cold start does."""
    g = _stack(p, d, seed=p)
    Y, trace = dense_flag_median(g, r, iters=6)
    X = unit(g).T
    rng = np.random.default_rng(1)
    for start in (rng.normal(size=(p, r)), np.concatenate([rng.normal(size=(p, r - 1)), np.zeros((p, 1))], 1)):
        _, fi = aggregators.flag_with_info(
            jnp.asarray(g), r=r, max_iters=6, tol=-np.inf, warm_start=3000, inner_iters=1000, start=jnp.asarray(start)
        )
        B = X @ np.asarray(fi.basis)
        assert projector_distance(B, Y) < 1e-4
        np.testing.assert_allclose(float(fi.objective), trace[-1], rtol=1e-3)


def test_warm_start_block_keeps_live_columns_and_refills_dead_ones():
    K = jnp.asarray(np.corrcoef(_stack(6, 40)), jnp.float32)
    valid = jnp.array([True] * 5 + [False])
    cold = solver.warm_start_block(K, valid, 3)
    start = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32).at[:, 1].set(0)
    got = solver.warm_start_block(K, valid, 3, start)
    np.testing.assert_array_equal(got[:5, 0], start[:5, 0])
    np.testing.assert_array_equal(got[:, 1], cold[:, 1])  # the dead column is the cold start's
    assert float(got[5, 0]) == 0.0  # an invalid row contributes nothing
    with pytest.raises(ValueError, match=r"start must be a \(p, r\)"):
        solver.warm_start_block(K, valid, 3, start[:, :2])


def test_state_carries_the_basis_from_round_to_round():
    """aggregate = init + update; update returns this round's basis as the next state, and a round started
    from it equals flag_with_info given that basis as its start."""
    g1 = jnp.asarray(_stack(seed=1), jnp.float32)
    g2 = g1 + 0.05 * jnp.asarray(_stack(seed=2), jnp.float32)
    key = jax.random.key(0)
    s0 = aggregators.init_state("flag", jax.ShapeDtypeStruct(g1.shape, g1.dtype), warm_start=2)
    assert isinstance(s0, FlagState) and s0.basis.shape == (15, 8) and not bool(s0.basis.any())
    a1, s1, info = aggregators.aggregate_update("flag", g1, s0, f=3, key=key, warm_start=2)
    np.testing.assert_array_equal(a1, aggregators.aggregate("flag", g1, f=3, warm_start=2))
    assert set(info) == {"ratios", "status"}
    _, fi1 = aggregators.flag_with_info(g1, warm_start=2)
    np.testing.assert_array_equal(s1.basis, fi1.basis)
    a2, s2, _ = aggregators.aggregate_update("flag", g2, s1, f=3, key=key, warm_start=2)
    want, fi2 = aggregators.flag_with_info(g2, warm_start=2, start=s1.basis)
    np.testing.assert_array_equal(a2, want)
    np.testing.assert_array_equal(s2.basis, fi2.basis)
    # the warm round is a different start from the cold one, and lands on the same aggregate direction
    cold = aggregators.aggregate("flag", g2, f=3)
    assert float(jnp.dot(a2, cold) / (jnp.linalg.norm(a2) * jnp.linalg.norm(cold))) > 0.99
    # without warm_start the rule keeps no state, as before
    assert aggregators.init_state("flag", jax.ShapeDtypeStruct(g1.shape, g1.dtype)) == ()


def test_state_is_sized_after_the_pre_aggregators():
    ex = jax.ShapeDtypeStruct((16, 10), jnp.float32)
    assert aggregators.init_state("bucketing+flag", ex, warm_start=2).basis.shape == (8, 5)
    assert aggregators.init_state("nnm+flag", ex, f=3, warm_start=2).basis.shape == (16, 9)


def test_bad_warm_start_is_refused_by_name(tmp_path):
    g = jnp.ones((5, 4))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warm_start must be a Python int >= 0"):
            aggregators.flag_with_info(g, warm_start=bad)
    with pytest.raises(ValueError, match="only used with warm_start > 0"):
        aggregators.flag_with_info(g, start=jnp.zeros((5, 3)))
    with pytest.raises(train.ConfigError, match="rule_hparams.warm_start"):
        small_config(tmp_path, rule_hparams={"warm_start": -2}).validate()
    with pytest.raises(train.ConfigError, match="rule_hparams.warm_start.*several values"):
        small_config(tmp_path, rule_hparams={"warm_start": train.Values((1, 2))}).validate()


def test_layout_falls_back_to_server_only_with_a_state():
    """FA with a warm start keeps a state, which the sharded layout (stateless Gram form) cannot carry;
    plain FA still shards."""
    warm = parallel.StepConfig(num_workers=8, rule="flag", rule_hparams=(("warm_start", 2),), layout="sharded")
    layout, why = parallel.resolve_layout(warm, 4)
    assert layout == "server" and "keeps a state" in why
    assert parallel.resolve_layout(dataclasses.replace(warm, rule_hparams=()), 4)[0] == "sharded"
    cc = parallel.StepConfig(num_workers=8, rule="centered_clipping", rule_hparams=(("center", "previous"),))
    assert aggregators.get("centered_clipping").keeps_state(8, **dict(cc.rule_hparams))
    assert not aggregators.get("centered_clipping").keeps_state(8)


def test_training_carries_the_state_and_resumes_it(tmp_path):
    """In training the state is the last round's basis (one per run of the batch), a batch of two seeds
    equals the two runs alone, and a checkpoint resumes it exactly."""
    kw = dict(attack="random", rule_hparams={"warm_start": 2}, steps=4)
    batch = train.train_and_evaluate(small_config(tmp_path / "b", seed=train.Values((0, 1)), **kw), dataset=DS)
    for res in batch:
        alone = train.run(small_config(tmp_path / f"s{res.config.seed}", seed=res.config.seed, **kw), dataset=DS)
        np.testing.assert_allclose(ravel_pytree(res.params)[0], ravel_pytree(alone.params)[0], rtol=1e-3, atol=1e-4)
    basis = np.asarray(alone.state.rule_state.basis)
    assert basis.shape == (8, 5) and np.abs(basis).sum() > 0
    part = small_config(tmp_path / "part", seed=1, checkpoint_every=2, **kw)
    train.run(dataclasses.replace(part, steps=2), dataset=DS)
    resumed = train.run(dataclasses.replace(part, resume=True), dataset=DS)
    np.testing.assert_array_equal(ravel_pytree(resumed.params)[0], ravel_pytree(alone.params)[0])
    np.testing.assert_array_equal(np.asarray(resumed.state.rule_state.basis), basis)
