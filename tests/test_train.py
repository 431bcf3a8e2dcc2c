"""The training system: per-worker gradients, layouts, device counts, resume, CLI errors."""

import dataclasses
import json
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from flagjax import aggregators, cli, data, models, parallel, train
from tests.helpers import DS, Crash, crash_at
from tests.helpers import small_config as _cfg


def test_per_worker_gradients_are_per_worker():
    """Under shard_map the stacked rows must be each worker's own gradient, not the psum."""
    mesh = parallel.make_mesh(8)
    model = models.make_model("mlp", 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    cfg = parallel.StepConfig(num_workers=8, num_byzantine=0, rule="mean", attack="none")
    captured = {}

    def spy(stack, **kwargs):
        jax.debug.callback(lambda a: captured.__setitem__("stack", np.asarray(a)), stack)
        return stack.mean(0)

    aggregators.register(aggregators.Rule("_spy", spy, sanitize=False))
    try:
        cfg = dataclasses.replace(cfg, rule="_spy")
        tx = optax.sgd(0.0)
        step, layout, _ = parallel.build_step(model, lambda hp: tx, cfg, mesh, params)
        x = DS.train_x[:64].reshape(8, 8, 28, 28, 1)
        y = DS.train_y[:64].reshape(8, 8)
        state = parallel.TrainState(
            jnp.int32(0),
            jax.tree.map(jnp.copy, params),  # the step donates its state
            {},
            tx.init(params),
            parallel.init_worker_momentum(cfg, params, mesh),
            jax.random.key_data(jax.random.key(0)),
            parallel.init_rule_state(cfg, params),
        )
        jax.block_until_ready(step(state, jnp.asarray(x), jnp.asarray(y), {}))
    finally:
        aggregators.unregister("_spy")
    stack = captured["stack"]

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()

    for k in range(8):
        g = ravel_pytree(jax.grad(loss)(params, x[k], y[k]))[0]
        np.testing.assert_allclose(stack[k], g, rtol=2e-4, atol=2e-6)
    assert np.linalg.norm(stack[0] - stack[1]) > 1e-3 * np.linalg.norm(stack[0])


def test_centered_clipping_is_centred_on_the_previous_aggregate(tmp_path):
    """rule_hparams center='previous': the rule's state carries step t-1's aggregate, which centres step t
    (zeros at step 0). The spy wraps the registered rule's own init/update and records what it sees."""
    from flagjax.aggregators import distance

    seen = []
    cc = aggregators.get("centered_clipping")

    def spy(stack, state, *, f, key, **hp):
        jax.debug.callback(lambda s, c: seen.append((np.asarray(s), np.asarray(c))), stack, state.center)
        return cc.update(stack, state, f=f, key=key, **hp)

    aggregators.register(aggregators.Rule("_spy_cc", distance.centered_clipping, init=cc.init, update=spy))
    try:
        cfg = _cfg(tmp_path, rule="_spy_cc", rule_hparams={"tau": 0.05, "center": "previous"}, attack="random")
        su = train.setup(dataclasses.replace(cfg, num_devices=1), dataset=DS)
        state = su.state
        aggs = []
        for k in range(3):
            state, _ = su.step(state, *su.batch(k))
            aggs.append(np.asarray(state.rule_state.center)[0])  # the rule's state; the batch of one run
    finally:
        aggregators.unregister("_spy_cc")
    assert len(seen) == 3
    np.testing.assert_array_equal(seen[0][1], 0.0)
    for k in range(3):
        stack, center = seen[k]
        if k:
            np.testing.assert_array_equal(center, aggs[k - 1])
        # float64 reference: v = c + (1/p) sum_i clip_tau(g_i - c)
        u = stack.astype(np.float64) - center
        s = np.minimum(1.0, 0.05 / np.linalg.norm(u, axis=1))
        np.testing.assert_allclose(aggs[k], center + (s[:, None] * u).mean(0), rtol=1e-4, atol=1e-7)


def test_optimal_attack_sees_the_previous_center():
    """An optimal attack against a rule centred on the previous aggregate simulates it with that center."""
    from flagjax import attacks

    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    # a center on the attack's own line m - t sd makes the line search's choice depend on it
    prev = stack[:6].mean(0) - 5 * stack[:6].std(0)
    hp = {"tau": 0.5, "iters": 3}
    cfg = parallel.StepConfig(
        num_workers=8,
        num_byzantine=2,
        rule="centered_clipping",
        rule_hparams=tuple({**hp, "center": "previous"}.items()),
        attack="optimal_alie",
        attack_hparams=(("rule", "centered_clipping"), ("rule_hparams", {**hp, "center": "previous"})),
    )
    key = jax.random.key(3)
    got = parallel.attacked_stack(cfg, stack, key, aggregators.CenterState(prev))
    want = attacks.attack(
        "optimal_alie", stack[:6], f=2, key=key, rule="centered_clipping", rule_hparams={**hp, "center": prev}
    )
    np.testing.assert_array_equal(got[6:], want)
    zero = attacks.attack("optimal_alie", stack[:6], f=2, key=key, rule="centered_clipping", rule_hparams=hp)
    assert not np.allclose(want, zero)  # so the test fails if the center were not passed on


def test_array_center_is_passed_as_is():
    """A fixed (D,) array as center is not mistaken for "previous" (no elementwise comparison): the rule
    stays stateless and centres on the array."""
    from flagjax.aggregators import distance

    center = np.full(3, 0.5, np.float32)
    cfg = parallel.StepConfig(num_workers=4, rule="centered_clipping", rule_hparams=(("center", center),))
    assert not parallel.uses_previous_center(cfg)
    example = jax.ShapeDtypeStruct((3,), jnp.float32)
    assert aggregators.init_state("centered_clipping", example, center=center) == ()
    stack = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    agg, state, _ = aggregators.aggregate_update("centered_clipping", stack, (), f=1, key=None, center=center, tau=0.1)
    assert state == ()
    np.testing.assert_allclose(agg, distance.centered_clipping(stack, center=center, tau=0.1), rtol=1e-6)


def test_user_rule_with_state_trains_and_checkpoints(tmp_path):
    """A user's own stateful rule (registered, never named in parallel.py) carries its state through
    training and a checkpoint: here a rule that counts its rounds and averages the rows."""

    class Count(NamedTuple):
        rounds: jax.Array

    def update(stack, state, *, f, key, **hp):
        return stack.mean(0), Count(state.rounds + 1), {}

    rule = aggregators.Rule(
        "_counting_mean", lambda s, **k: s.mean(0), init=lambda ex, **hp: Count(jnp.int32(0)), update=update
    )
    aggregators.register(rule)
    try:
        assert rule.stateful and not aggregators.get("mean").stateful
        res = train.run(_cfg(tmp_path, rule="_counting_mean", steps=5, checkpoint_every=2), dataset=DS)
        assert int(res.state.rule_state.rounds) == 5
        resumed = train.run(_cfg(tmp_path, rule="_counting_mean", steps=7, resume=True), dataset=DS)
        assert int(resumed.state.rule_state.rounds) == 7
    finally:
        aggregators.unregister("_counting_mean")


def test_previous_center_needs_a_rule_with_a_center(tmp_path):
    with pytest.raises(ValueError, match="center='previous' needs a rule with a center argument"):
        train.setup(_cfg(tmp_path, rule="median", rule_hparams={"center": "previous"}), dataset=DS)
    with pytest.raises(ValueError, match="rule_hparams.center must be 'previous'"):
        train.setup(_cfg(tmp_path, rule="centered_clipping", rule_hparams={"center": "last"}), dataset=DS)
    # the same checks for the rule an optimal attack simulates (its own rule_hparams; default rule: mean)
    for atk_hp, msg in [
        ({"rule": "median", "rule_hparams": {"center": "previous"}}, "attack_hparams.rule_hparams.center='previous'"),
        ({"rule_hparams": {"center": "previous"}}, "'mean' has none"),
        ({"rule": "centered_clipping", "rule_hparams": {"center": "last"}}, "attack_hparams.rule_hparams.center must"),
    ]:
        cfg = _cfg(tmp_path, attack="optimal_alie", attack_hparams=atk_hp)
        with pytest.raises(ValueError, match=re.escape(msg)):
            train.setup(cfg, dataset=DS)


@pytest.mark.parametrize("layout", ["server", "sharded"])
def test_end_to_end_each_layout(tmp_path, layout):
    res = train.run(_cfg(tmp_path, layout=layout, num_devices=8), dataset=DS)
    assert res.layout == layout
    lines = [json.loads(s) for s in res.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert "test_accuracy" in lines[1] and "ratios" in lines[0] and len(lines[0]["ratios"]) == 8
    assert all(np.isfinite(r["loss"]) for r in lines)


@pytest.mark.parametrize(
    "rule,attack",
    [
        ("flag", "alie"),
        ("median", "signflip"),
        ("mean", "ipm"),
        ("trimmed_mean", "lotka_volterra"),
        ("normalized_mean", "signflip"),
    ],
)
def test_sharded_equals_server(tmp_path, rule, attack):
    out = {}
    for layout in ("server", "sharded"):
        cfg = _cfg(tmp_path / layout, layout=layout, num_devices=8, rule=rule, attack=attack, steps=3)
        out[layout] = train.run(cfg, dataset=DS)
        assert out[layout].layout == layout
    a = ravel_pytree(out["server"].params)[0]
    b = ravel_pytree(out["sharded"].params)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sharded_falls_back_for_whole_row_rules(tmp_path):
    res = train.run(_cfg(tmp_path, layout="sharded", num_devices=8, rule="multi_krum", steps=1), dataset=DS)
    assert res.layout == "server" and "multi_krum" in res.layout_note


@pytest.mark.parametrize("rule,atol", [("mean", 1e-6), ("median", 1e-6), ("flag", 1e-4)])
def test_one_device_equals_eight(tmp_path, rule, atol):
    """Same numbers on 1 and 8 devices. The per-worker gradients differ by float32 rounding (different
    XLA fusions); mean/median pass that through, FA's IRLS (weights up to eps^-1/2 = 1e3) amplifies
    it to ~1e-5 after 4 steps, hence its looser bound."""
    runs = [
        train.run(_cfg(tmp_path / str(n), num_devices=n, rule=rule, attack="random", worker_momentum=0.9), dataset=DS)
        for n in (1, 8)
    ]
    np.testing.assert_allclose(ravel_pytree(runs[0].params)[0], ravel_pytree(runs[1].params)[0], rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    "kw",
    [
        dict(worker_momentum=0.5),
        dict(rule="centered_clipping", rule_hparams={"tau": 0.1, "center": "previous"}),
    ],
    ids=["flag+worker_momentum", "centered_clipping_previous"],
)
def test_resume_matches_uninterrupted(tmp_path, kw):
    """Everything a step carries (worker momentum, the previous aggregate) survives a checkpoint."""
    full = train.run(_cfg(tmp_path / "full", steps=6, attack="random", **kw), dataset=DS)
    part = _cfg(tmp_path / "part", steps=6, attack="random", checkpoint_every=3, **kw)

    with pytest.raises(Crash):  # dies after the step-3 checkpoint, mid-way through step 5's bookkeeping
        train.run(part, dataset=DS, on_step=crash_at(5))
    resumed = train.run(dataclasses.replace(part, resume=True), dataset=DS)
    np.testing.assert_array_equal(ravel_pytree(full.params)[0], ravel_pytree(resumed.params)[0])
    a = [json.loads(s) for s in full.metrics_path.read_text().splitlines()]
    b = [json.loads(s) for s in resumed.metrics_path.read_text().splitlines()]
    drop = ("wall_time", "step_time")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_training_learns_and_flag_resists_random_attack(tmp_path):
    accs = {}
    for rule in ("flag", "mean"):
        cfg = _cfg(tmp_path / rule, rule=rule, attack="random", steps=30, eval_every=30, lr=0.1, batch_size=16)
        accs[rule] = train.run(cfg, dataset=DS).final["test_accuracy"]
    assert accs["flag"] > 0.8, accs
    assert accs["mean"] < 0.5, accs


@pytest.mark.parametrize(
    "args,msg",
    [
        (["train", "num_byzantine=8", "num_workers=8"], "num_byzantine"),
        (["train", "rule=bulyan", "num_workers=10", "num_byzantine=2"], "p >= 4f + 3"),
        (["train", "rule_hparams.r=99", "num_workers=8"], "rule_hparams.r"),
        (["train", "attack=nope"], "attack"),
        (["train", "model=vgg"], "model"),
        (["train", "dataset=cifar"], "dataset"),
        (["train", "lr=-1"], "lr"),
        (["train", "nope=1"], "unknown config key"),
        (["train", "steps=abc"], "steps"),
        (["train", "rule=krum", "num_byzantine=7"], "num_byzantine"),
    ],
)
def test_cli_config_errors_exit_2(capsys, args, msg):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_missing_data_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("FLAGJAX_DATA_DIR", raising=False)
    assert cli.main(["train", "steps=1", f"out_dir={tmp_path}/o"]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and "FLAGJAX_DATA_DIR" in err


def test_worker_shards_split_among_the_honest_workers():
    """``split_among="honest"``: the p - f honest workers (the first ones) share the split exactly as
    data.shard_indices cuts it for p - f workers (ByzFL's clients), and each Byzantine worker holds an iid
    sample of an honest shard's size; ``"all"`` (the default) cuts it for all p workers."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    cfg = train.TrainConfig(num_workers=13, num_byzantine=3, shard="gamma", gamma_similarity=0.0, split_among="honest")
    shards = train.worker_shards(cfg, labels)
    assert len(shards) == 13
    expect = data.shard_indices(labels, 10, scheme="gamma", gamma=0.0, seed=cfg.seed)
    for got, want in zip(shards[:10], expect, strict=True):
        np.testing.assert_array_equal(got, want)
    assert sorted(np.concatenate(shards[:10]).tolist()) == list(range(1000))  # every label reaches an honest worker
    for s in shards[10:]:
        assert len(s) == 100 and len(np.unique(s)) == 100 and s.max() < 1000
    assert not np.array_equal(shards[10], shards[11])
    everyone = train.worker_shards(dataclasses.replace(cfg, split_among="all"), labels)
    expect = data.shard_indices(labels, 13, scheme="gamma", gamma=0.0, seed=cfg.seed)
    for got, want in zip(everyone, expect, strict=True):
        np.testing.assert_array_equal(got, want)
    for field, value in (("split_among", "byzantine"), ("gamma_similarity", 1.5), ("shard", "extreme")):
        with pytest.raises(train.ConfigError, match=f"invalid {field}="):
            dataclasses.replace(cfg, **{field: value}).validate()
