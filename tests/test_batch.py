"""A batch of runs as one program (issue #14, item 4): every run of a batch gives the numbers it gives
trained alone, writes its own folder, resumes, and bad batch axes are refused by name."""

import dataclasses
import json

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from flagjax import cli, data, train
from tests.helpers import DS, Crash, crash_at, small_config


def _cfg(tmp_path, *overrides, **kw):
    """The shared small config with reverse attackers and a validation split (so every run has its own
    split), then ``field=value`` overrides as on the command line."""
    kw = {"attack": "reverse", "val_fraction": 0.1, "out_dir": str(tmp_path), **kw}
    return train.apply_overrides(small_config(tmp_path, **kw), list(overrides))


def _params(res):
    return ravel_pytree(res.params)[0]


def _assert_same_run(a, b, atol, rtol=1e-4):
    """Same metrics and parameters up to float32 rounding. FA's reconstruction ratios of a worker near
    the subspace's edge move ~1e-4 with rounding of its IRLS (small eigen-gap), hence their bound; for
    the same reason its convergence flag (``status``: converged within max_iters or not, a relative
    objective decrease of 1e-5) can flip, so it is not compared."""
    drop = ("wall_time", "step_time", "status")
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
    for ha, hb in zip(a.history, b.history, strict=True):
        for k in ha:
            if k not in drop:
                tol = 1e-3 if k.endswith("ratios") else atol
                np.testing.assert_allclose(ha[k], hb[k], rtol=rtol, atol=tol, err_msg=k)
    np.testing.assert_allclose(_params(a), _params(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout,devices", [("server", 1), ("sharded", 4)])
def test_each_run_of_a_batch_equals_its_single_run(tmp_path, layout, devices):
    """seed and lr batched together (2 x 2 = 4 runs, one program) against the 4 runs trained alone; each
    seed has its own validation split, worker shards, batches, initialisation and attack keys."""
    cfg = _cfg(tmp_path / "batch", "seed=0,1", "lr=0.05,0.1", layout=layout, num_devices=devices)
    batch = train.train_and_evaluate(cfg, dataset=DS)
    assert [r.name for r in batch] == ["lr_0.05__seed_0", "lr_0.05__seed_1", "lr_0.1__seed_0", "lr_0.1__seed_1"]
    for res in batch:
        assert res.metrics_path == tmp_path / "batch" / res.name / "metrics.jsonl"
        assert res.metrics_path.exists()
        alone = train.run(
            _cfg(tmp_path / res.name, layout=layout, num_devices=devices, seed=res.config.seed, lr=res.config.lr),
            dataset=DS,
        )
        # FA amplifies float32 rounding (different fusions in a batch and across devices; see test_train)
        _assert_same_run(res, alone, atol=1e-4, rtol=1e-3)
    # the runs differ from each other (the batch is not one run repeated)
    assert not np.allclose(_params(batch[0]), _params(batch[1]))
    assert batch[0].final["val_accuracy"] is not None


def test_batched_rule_and_attack_hparams_equal_single_runs(tmp_path):
    cfg = _cfg(tmp_path / "b", "rule_hparams.lam=0,2", "attack_hparams.factor=-10,-3")
    batch = train.train_and_evaluate(cfg, dataset=DS)
    assert len(batch) == 4 and batch[3].name == "attack_hparams.factor_-3__rule_hparams.lam_2"
    for res in (batch[0], batch[3]):
        one = _cfg(
            tmp_path / res.name,
            rule_hparams={"lam": res.config.rule_hparams["lam"]},
            attack_hparams={"factor": res.config.attack_hparams["factor"]},
        )
        _assert_same_run(res, train.run(one, dataset=DS), atol=1e-5)
    assert not np.allclose(_params(batch[0]), _params(batch[3]))


def test_runs_per_program_splits_the_batch_without_changing_it(tmp_path):
    full = train.train_and_evaluate(_cfg(tmp_path / "a", "seed=0,1,2", rule="median"), dataset=DS)
    chunked = train.train_and_evaluate(
        _cfg(tmp_path / "b", "seed=0,1,2", "runs_per_program=2", rule="median"), dataset=DS
    )
    assert [r.name for r in chunked] == [r.name for r in full]
    for a, b in zip(full, chunked, strict=True):
        _assert_same_run(a, b, atol=1e-6)


def test_a_batch_resumes_exactly(tmp_path):
    full = train.train_and_evaluate(_cfg(tmp_path / "full", "seed=0,1", steps=6), dataset=DS)
    part = _cfg(tmp_path / "part", "seed=0,1", steps=6, checkpoint_every=3)

    with pytest.raises(Crash):
        train.train_and_evaluate(part, dataset=DS, on_step=crash_at(5))
    resumed = train.train_and_evaluate(dataclasses.replace(part, resume=True), dataset=DS)
    for a, b in zip(full, resumed, strict=True):
        np.testing.assert_array_equal(_params(a), _params(b))
        la = [{k: v for k, v in h.items() if k not in ("wall_time", "step_time")} for h in a.history]
        lb = [{k: v for k, v in h.items() if k not in ("wall_time", "step_time")} for h in b.history]
        assert la == lb


@pytest.mark.parametrize(
    "overrides,msg",
    [
        (["num_workers=8,10"], "invalid num_workers=[8, 10]: only seed, lr"),
        (["seed=1,1"], "invalid seed=[1, 1]: repeated values"),
        # declared structural (Rule.static_hparams): refused before anything is built
        (["rule_hparams.r=2,3"], "invalid rule_hparams.r=[2, 3]: must be one value: r sets the structure of flag's"),
        (["rule_hparams.max_iters=5,10"], "invalid rule_hparams.max_iters=[5, 10]: must be one value"),
        (["rule=centered_clipping", "rule_hparams.iters=1,2"], "invalid rule_hparams.iters=[1, 2]: must be one value"),
    ],
)
def test_bad_batch_axes_name_the_field(tmp_path, overrides, msg):
    with pytest.raises(train.ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        train.train_and_evaluate(_cfg(tmp_path, *overrides), dataset=DS)


def test_run_refuses_a_batch(tmp_path):
    with pytest.raises(train.ConfigError, match="use train_and_evaluate"):
        train.run(_cfg(tmp_path, "seed=0,1"), dataset=DS)


def test_overrides_parse_lists_only_outside_brackets():
    cfg = train.apply_overrides(train.TrainConfig(), ["seed=0,1,2", 'attack_hparams={"factors": [1, 2]}', "lr=0.1"])
    assert cfg.seed == train.Values((0, 1, 2)) and cfg.lr == 0.1
    assert cfg.attack_hparams == {"factors": [1, 2]}  # a plain list in a dict is one value
    assert [n for n, _ in train.expand(cfg)] == ["seed_0", "seed_1", "seed_2"]
    assert train.expand(train.TrainConfig())[0][0] == ""


def test_cli_batch_with_overrides_after_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: DS)
    out = tmp_path / "cli"
    argv = ["train", "dataset=synthetic", "--process-id", "0", "model=mlp", "num_workers=4", "num_byzantine=1"]
    argv += ["steps=2", "eval_every=2", "seed=0,1", f"out_dir={out}"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "2 runs trained as one program" in text
    for s in (0, 1):
        lines = [json.loads(x) for x in (out / f"seed_{s}" / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 2 and "test_accuracy" in lines[-1]


def test_a_batch_too_large_for_the_device_is_split_or_refused(tmp_path, monkeypatch):
    """With the device's memory known (here set through FLAGJAX_DEVICE_MEMORY_BYTES), runs_per_program=0
    puts as many runs in a program as fit, measured from XLA's memory analysis of the batch's program;
    when not even one fits, a ConfigError names batch_size. The chunked runs equal the single program's."""
    cfg = _cfg(tmp_path / "one", "seed=0,1,2", rule="median")
    need = train.program_bytes(cfg, DS)
    one_program = train.train_and_evaluate(cfg, dataset=DS)
    assert {r.runs_in_program for r in one_program} == {3}
    monkeypatch.setenv(train.MEMORY_ENV, str(10 * need))  # fits: trains on the setup the check measured
    roomy = train.train_and_evaluate(_cfg(tmp_path / "roomy", "seed=0,1,2", rule="median"), dataset=DS)
    assert [r.runs_in_program for r in roomy] == [3, 3, 3]
    for a, b in zip(one_program, roomy, strict=True):
        _assert_same_run(a, b, atol=1e-6)
    monkeypatch.setenv(train.MEMORY_ENV, str(int(2.5 * need / 3 / 0.9)))  # room for two runs' share
    split = train.train_and_evaluate(_cfg(tmp_path / "split", "seed=0,1,2", rule="median"), dataset=DS)
    assert [r.runs_in_program for r in split] == [2, 2, 1]
    for a, b in zip(one_program, split, strict=True):
        _assert_same_run(a, b, atol=1e-6)
    monkeypatch.setenv(train.MEMORY_ENV, str(need // 10))
    with pytest.raises(train.ConfigError, match="invalid batch_size=8: one run's training step needs"):
        train.train_and_evaluate(_cfg(tmp_path / "no", "seed=0,1,2", rule="median"), dataset=DS)


def test_runs_one_after_the_other_in_a_program_equal_vectorized_runs(tmp_path):
    """runs_vectorized=1 (lax.map, no vmap) and 2 (groups of two, the last one short) give the numbers of
    all runs vectorized."""
    ref = train.train_and_evaluate(_cfg(tmp_path / "all", "seed=0,1,2", rule="median"), dataset=DS)
    for k in (1, 2):
        got = train.train_and_evaluate(
            _cfg(tmp_path / str(k), "seed=0,1,2", f"runs_vectorized={k}", rule="median"), dataset=DS
        )
        for a, b in zip(ref, got, strict=True):
            _assert_same_run(a, b, atol=1e-6)


def test_static_hparams_are_real_keyword_parameters():
    """Every name a rule declares structural (``Rule.static_hparams``, what the config refuses to batch)
    is a keyword parameter of the rule (of its ``*_with_info`` form where the rule passes **kwargs on)."""
    import inspect
    import sys

    from flagjax import aggregators

    for name in aggregators.names():
        rule = aggregators.get(name)
        params = inspect.signature(rule.fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            module = sys.modules[rule.fn.__module__]
            params = inspect.signature(getattr(module, f"{name}_with_info")).parameters
        missing = set(rule.static_hparams) - set(params)
        assert not missing, f"{name}: static_hparams {sorted(missing)} are not parameters"
    assert {"r", "max_iters", "warm_start", "sketch"} <= set(aggregators.get("flag").static_hparams)
    assert "lam" not in aggregators.get("flag").static_hparams  # traced: a batch axis
