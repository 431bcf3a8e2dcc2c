"""Same config => same numbers on any device count and layout, for every attack (issue #14, item 3).

Keys are split by name once per step and shared by every device; whole-row random choices (which
honest row ``reverse``/``drop`` copy) come from the attack key alone; per-coordinate noise is drawn per
fixed block of global coordinates (``flagjax.attacks.coordinate_noise``). The rule is the mean, which
passes every Byzantine value straight into the update, so any difference in the attacked rows shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from flagjax import attacks, models, parallel, train
from tests.helpers import DS, small_config

GRADIENT_ATTACKS = attacks.names(data_level=False)
ALL_ATTACKS = tuple(a for a in attacks.names() if a != "none")


def _run(tmp_path, **kw):
    out = tmp_path / "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
    kw = {"rule": "mean", "steps": 3, "eval_every": 0, **kw}
    return train.run(small_config(out, **kw), dataset=DS)


def _same(a, b, rtol=1e-5, atol=None):
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=rtol)
    pa, pb = ravel_pytree(a.params)[0], ravel_pytree(b.params)[0]
    atol = rtol * float(np.max(np.abs(np.nan_to_num(pa)))) if atol is None else atol
    np.testing.assert_allclose(pa, pb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_every_attack_agrees_across_layouts_and_device_counts(tmp_path, attack):
    # inf/nan rows poison the mean (NaN parameters compare equal); the median shows the rows are dropped alike
    rule = "median" if attack in ("inf", "nan") else "mean"
    ref = _run(tmp_path, attack=attack, rule=rule, layout="server", num_devices=1)
    assert all(np.isfinite(h["loss"]) for h in ref.history)
    for n in (4, 8):
        got = _run(tmp_path, attack=attack, rule=rule, layout="sharded", num_devices=n)
        separable = attacks.get(attack).separable
        assert got.layout == ("sharded" if separable else "server")
        _same(ref, got)


@pytest.mark.parametrize("attack,rule", [("reverse", "median"), ("drop", "flag"), ("random", "normalized_mean")])
def test_one_two_four_eight_devices_both_layouts(tmp_path, attack, rule):
    """The issue's example (median, reverse) and FA / normalized_mean, which run from a psum of partial
    Gram matrices in the sharded layout; with stragglers (drop_prob) too."""
    ref = _run(tmp_path, attack=attack, rule=rule, layout="server", num_devices=1, drop_prob=0.2)
    for layout in ("server", "sharded"):
        for n in (1, 2, 4, 8):
            got = _run(tmp_path, attack=attack, rule=rule, layout=layout, num_devices=n, drop_prob=0.2)
            # FA's IRLS amplifies float32 rounding of the per-worker gradients (see test_train)
            _same(ref, got, *((1e-4, 1e-4) if rule == "flag" else (1e-5,)))


@pytest.mark.parametrize("attack", [a for a in GRADIENT_ATTACKS if attacks.get(a).separable])
def test_separable_attacks_are_the_same_on_any_column_slicing(attack):
    """attack(honest)[:, a:b] == attack(honest[:, a:b], offset=a) for slices that cross noise blocks."""
    d = 2 * attacks.NOISE_BLOCK + 123
    honest = jax.random.normal(jax.random.key(1), (5, d))
    key = jax.random.key(7)
    full = np.asarray(attacks.attack(attack, honest, f=3, key=key))
    for a, b in [(0, 100), (100, attacks.NOISE_BLOCK + 50), (attacks.NOISE_BLOCK - 1, d)]:
        part = jax.jit(lambda h, o: attacks.attack(attack, h, f=3, key=key, offset=o))(honest[:, a:b], a)
        # statistics (ALIE's std) may round differently under jit; noise and row choices are identical
        np.testing.assert_allclose(np.asarray(part), full[:, a:b], rtol=1e-5, atol=1e-6)


def test_step_keys_are_distinct_and_named():
    keys = parallel.step_keys(jax.random.key(0))
    assert set(keys) == {"data", "attack", "rule", "drop"}
    raw = {k: tuple(np.asarray(jax.random.key_data(v)).tolist()) for k, v in keys.items()}
    assert len(set(raw.values())) == 4


def test_offset_is_refused_for_whole_row_attacks():
    with pytest.raises(ValueError, match="separable"):
        attacks.attack("minmax", np.ones((4, 10), np.float32), f=2, key=jax.random.key(0), offset=3)


@pytest.mark.parametrize("layout,n", [("server", 1), ("sharded", 2)])
def test_worker_gradient_loop_equals_vmap(tmp_path, layout, n):
    """``worker_grads="loop"`` (one gradient program per worker, what "auto" picks on CPU for convolutional
    models: test_worker_loop_choice) and ``"vmap"`` train the same numbers up to float rounding, in both
    layouts."""
    kw = dict(model="cnn", num_workers=4, num_byzantine=1, attack="alie", rule="trimmed_mean", layout=layout)
    ref = _run(tmp_path, worker_grads="vmap", num_devices=n, **kw)
    _same(ref, _run(tmp_path, worker_grads="loop", num_devices=n, **kw), 1e-5)


def test_worker_loop_choice(tmp_path):
    """ "auto" loops on CPU for a model with a convolution and at most LOOP_MAX_WORKERS workers per device."""
    x = jnp.ones((2, 28, 28, 1))
    for name, conv in (("cnn", True), ("mlp", False)):
        m = models.make_model(name, 10)
        v = m.init(jax.random.key(0), x)
        fn = jax.grad(lambda p, m=m, v=v: m.apply({**v, "params": p}, x).sum())
        assert parallel.use_worker_loop("auto", "cpu", 8, fn, v["params"]) is conv
        assert not parallel.use_worker_loop("auto", "gpu", 8, fn, v["params"])
        assert not parallel.use_worker_loop("auto", "cpu", parallel.LOOP_MAX_WORKERS + 1, fn, v["params"])
        assert parallel.use_worker_loop("loop", "gpu", 8, fn, v["params"])
        assert not parallel.use_worker_loop("vmap", "cpu", 8, fn, v["params"])
    with pytest.raises(ValueError, match="worker_grads must be one of"):
        parallel.use_worker_loop("unrolled", "cpu", 8, fn, v["params"])
    with pytest.raises(train.ConfigError, match="worker_grads"):
        small_config(tmp_path, worker_grads="unrolled").validate()
