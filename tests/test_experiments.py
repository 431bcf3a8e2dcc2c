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
