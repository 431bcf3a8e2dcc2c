"""Every experiment script runs end to end in --quick mode (synthetic data, a few steps)."""

import importlib
import re

import pytest

SCRIPTS = [
    ("fig1_mean_not_robust", []),
    ("fig2_tolerance", []),
    ("fig6_augmented", []),
    ("attack_heatmap", []),
    ("fig7_lambda_sweep", []),
    ("fig10_ratio_histogram", []),
    ("fig3_batch_size", []),
    ("fig4_drop", []),
    ("fig5_num_workers", []),
    ("fig8_scalability", []),
    ("questions", []),
    ("lr_protocol", []),
    ("spot_check", []),
    ("peer_byzfl", ["--attacks", "SF", "--fs", "1", "--gammas", "1,0.5"]),
    ("attack_strength", []),
    ("autodiff_heatmap", ["--rows", "mean", "attack_hparams.steps=2"]),
]


@pytest.mark.parametrize("name,extra", SCRIPTS)
def test_quick_run(tmp_path, name, extra):
    mod = importlib.import_module(f"experiments.{name}")
    out = tmp_path / name
    mod.main(["--quick", "--seeds", "1", "--out", str(out), "steps=2", "eval_every=2", *extra])
    text = (out / "README.md").read_text()
    assert "Produced by" in text and "QUICK" in text
    assert "|" in text
    # every report shows at least one plot, and every image it links was written next to it
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images, f"{name} links no plot"
    for img in images:
        assert (out / img).is_file(), f"{name} links {img}, which it did not write"


@pytest.mark.parametrize("part", ["error", "train", "large_p"])
def test_scale_parts_run_quick(tmp_path, part):
    from experiments import scale

    scale.main(["--part", part, "--quick", "--seeds", "1", "--out", str(tmp_path), "steps=2", "eval_every=2"])
    text = (tmp_path / part / "README.md").read_text()
    assert "Produced by" in text and "QUICK" in text and "|" in text
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / part / img).is_file()


def test_rows_and_cols_select_cells(tmp_path):
    """--rows/--cols pick table cells by label (labels may contain spaces and brackets); an unknown label
    is an error that lists the script's labels, not an empty report."""
    import json

    from experiments import attack_heatmap

    row = "centered_clipping(tau=1) from previous"
    out = tmp_path / "heatmap"
    args = ["--quick", "--seeds", "1", "--out", str(out), "steps=2", "eval_every=2"]
    attack_heatmap.main([*args, "--rows", row, "--cols", "optimal_ipm"])
    recs = json.loads((out / "records.json").read_text())
    assert [(r["row"], r["col"]) for r in recs] == [(row, "optimal_ipm")]
    with pytest.raises(SystemExit, match=r"--cols: unknown \['ipn'\].*'optimal_ipm'"):
        attack_heatmap.main([*args, "--rows", row, "--cols", "ipn"])
    from experiments import lr_protocol  # its vmapped grid picks rows and columns the same way

    with pytest.raises(SystemExit, match=r"--rows: unknown \['flg'\].*'flag'"):
        lr_protocol.main([*args, "--rows", "flg"])


def test_paper_setting_runs_on_tfds_mock_data(tmp_path):
    """--paper starts from experiments/configs/cifar10_resnet18.py (CIFAR-10 via TFDS, ResNet-18, batch
    128, p = 15); one cell of it trains end to end on TFDS mock data (CIFAR-shaped random images)."""
    import json

    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments import common, fig1_mean_not_robust

    cfg = common.base_config(common.parse_args("fig1_mean_not_robust", "", ["--paper"]))
    got = (cfg.dataset, cfg.model, cfg.batch_size, cfg.num_workers, cfg.lr)
    assert got == ("tfds:cifar10", "resnet18", 128, 15, 0.1)
    assert common.parse_args("fig2_tolerance", "", ["--paper"]).out.name == "fig2_tolerance_paper"
    out = tmp_path / "fig1_paper"
    small = ["steps=2", "batch_size=2", "eval_every=2", "eval_examples=16", "num_workers=3", "log_every=1"]
    with tfds.testing.mock_data(num_examples=64):
        cell = ["--rows", "flag", "--cols", "f=1"]
        fig1_mean_not_robust.main(["--paper", "--seeds", "1", *cell, "--out", str(out), *small])
    (rec,) = json.loads((out / "records.json").read_text())
    assert rec["steps"] == 2 and 0.0 <= rec["test_accuracy"] <= 1.0
    assert "--paper" in (out / "README.md").read_text()


def test_batch_runs_evaluate_batchnorm_models():
    """The batched sweeps (Fig. 7, the lr protocol) evaluate each model with its own BatchNorm statistics."""
    import dataclasses

    import numpy as np

    from experiments import common

    args = common.parse_args("fig7_lambda_sweep", "", ["--paper"])
    base = common.base_config(args, num_workers=3, num_byzantine=1, batch_size=2, steps=2, eval_every=2)
    base = dataclasses.replace(base, dataset="synthetic", eval_examples=16)
    recs = common.batch_runs(base, {"lam": [0.0, 1.0], "seed": [0, 1]}, label=lambda g: f"flag {g['lam']}")
    assert [(r["lam"], r["seed"]) for r in recs] == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    assert [len(r["history"]) for r in recs] == [1, 1, 1, 1]
    assert all(np.isfinite(r["history"][0]["test_loss"]) for r in recs)
    assert recs[0]["history"][0]["test_loss"] != recs[1]["history"][0]["test_loss"]


def test_lr_protocol_adds_seeds_without_redoing_cached_ones(tmp_path):
    """Each (rule, attack, seed) is its own cached program: --seeds 2 after --seeds 1 reuses seed 0's
    entries of the store and adds seed 1's, and the report's records cover both seeds."""
    import json

    from experiments import common, lr_protocol

    out = tmp_path / "lr"
    args = ["--quick", "--rows", "flag", "--out", str(out), "steps=2", "eval_every=2"]
    lr_protocol.main(["--seeds", "1", *args])
    store = common.RunStore(out / "runs.jsonl.gz")
    seed0 = [i for i in store.ids() if "__seed0__" in i]
    assert seed0
    for run_id in seed0:  # marks seed 0's entries: a recomputation would overwrite the mark
        store.put(run_id, {"json": [{**r, "val_accuracy": 0.5} for r in store.get(run_id)["json"]]})
    lr_protocol.main(["--seeds", "2", *args])
    names = common.RunStore(out / "runs.jsonl.gz").ids()
    assert names == sorted(seed0 + [i.replace("__seed0__", "__seed1__") for i in seed0])
    recs = json.loads((out / "records.json").read_text())
    assert sorted({r["seed"] for r in recs}) == [0, 1]
    assert {r["val_accuracy"] for r in recs if r["seed"] == 0} == {0.5}  # read back, not recomputed


def test_run_cells_trains_a_cells_seeds_as_one_program_and_reads_the_store_back(tmp_path):
    """A cell's seeds are one batch (one program) and land in the compact store; a second call trains
    nothing: it reads the (marked) runs back, and the store's bytes do not depend on when it was written."""
    import json

    from experiments import common, fig1_mean_not_robust

    out = tmp_path / "fig1"
    args = ["--quick", "--seeds", "2", "--rows", "flag", "--cols", "f=1", "--out", str(out), "--batch", "on", "steps=2"]
    fig1_mean_not_robust.main([*args, "eval_every=2"])
    store = common.RunStore(out / "runs.jsonl.gz")
    assert store.ids() == ["flag__f_1__s0", "flag__f_1__s1"]
    assert {store.get(i)["meta"]["runs_in_program"] for i in store.ids()} == {2}
    assert [store.get(i)["meta"]["config"]["seed"] for i in store.ids()] == [0, 1]
    for run_id in store.ids():
        row = store.get(run_id)
        row["history"][-1]["test_accuracy"] = 0.123
        store.put(run_id, {k: v for k, v in row.items() if k != "id"})
    before = (out / "runs.jsonl.gz").read_bytes()
    fig1_mean_not_robust.main([*args, "eval_every=2"])
    assert {r["test_accuracy"] for r in json.loads((out / "records.json").read_text())} == {0.123}
    common.RunStore(out / "runs.jsonl.gz").save()
    assert (out / "runs.jsonl.gz").read_bytes() == before


def test_autodiff_worst_case_table():
    """The recomputed worst case: the heatmap's worst attack (mean over seeds), the autodiff mean, their minimum
    and the move; a row the heatmap lacks gets dashes."""
    from experiments import autodiff_heatmap

    rec = lambda row, col, s, v: {"row": row, "col": col, "seed": s, "test_accuracy": v}  # noqa: E731
    heatmap = [rec("a", "alie", 0, 0.5), rec("a", "alie", 1, 0.7), rec("a", "ipm", 0, 0.65), rec("a", "ipm", 1, 0.65)]
    heatmap += [rec("b", "ipm", 0, 0.3)]
    ours = [rec("a", "autodiff", 0, 0.4), rec("a", "autodiff", 1, 0.6), rec("b", "autodiff", 0, 0.9)]
    ours += [rec("c", "autodiff", 0, 0.2)]
    lines = autodiff_heatmap.worst_case_table(ours, heatmap).splitlines()
    assert lines[2] == "| a | 0.600 | alie | 0.500 | 0.500 | -0.100 |"
    assert lines[3] == "| b | 0.300 | ipm | 0.900 | 0.300 | +0.000 |"
    assert lines[4] == "| c | — | — | 0.200 | — | — |"


def test_a_stored_run_trained_with_other_overrides_is_trained_again(tmp_path):
    """Run ids name the cell, not its hyperparameters: a run stored under the same id but trained with other
    values of the cell's overrides (e.g. an attack's convention changed) is not reused, it is trained again."""
    from experiments import common

    argv = ["--quick", "--seeds", "1", "--out", str(tmp_path), "steps=2", "eval_every=2"]
    args = common.parse_args("stale", "", argv)
    base = common.base_config(args)

    def stored_z(z):
        cell = common.Cell("alie", "f=3", {"rule": "median", "attack": "alie", "attack_hparams": {"z": z}})
        common.run_cells(args, [cell], base, progress=False)
        return common.store(args).get("alie__f_3__s0")["meta"]["config"]["attack_hparams"]["z"]

    assert stored_z(1.5) == 1.5
    assert stored_z(-1.5) == -1.5  # retrained, not read back
