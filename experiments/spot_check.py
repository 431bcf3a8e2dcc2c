"""Spot check of the batched training loop against the committed runs: a few heatmap cells (3 seeds each)
re-trained with today's code — each cell's seeds as ONE program (``flagjax.train.train_and_evaluate``) —
next to the committed single runs of the same cells (experiments/results/attack_heatmap/runs.jsonl.gz,
one program per run, trained before the step keys were split by name).

The two need not agree run by run: the attack and rule keys changed (random attacks draw other noise),
and float32 rounding differs between programs. What is compared is each cell's mean final test
accuracy, against the seed spread: the difference and the pooled standard deviation of the two groups.
"""

import numpy as np

from experiments import attack_heatmap, common

# FA, its ablation and a selection rule, under noise (whose draws changed with the keys) and under a
# crafted attack (which draws nothing): 6 cells x 3 seeds, about 15 minutes on the 2-core CPU
ROWS = ("flag", "normalized_mean", "multi_krum")
COLS = ("random", "alie")


def main(argv=None):
    args = common.parse_args("spot_check", __doc__, argv)
    base = common.base_config(args)
    cells = attack_heatmap.cells(ROWS, COLS)
    new = common.run_cells(args, cells, base, batch=True)  # the point of the check: seeds as one program
    committed = common.RunStore(common.RESULTS / "attack_heatmap" / "runs.jsonl.gz")
    rows = []
    recs = []
    for cell in cells:
        if args.quick:
            break
        old_runs = [committed.get(common._slug(f"{cell.row}__{cell.col}__s{s}")) for s in range(args.seeds)]
        old = [run["history"][-1]["test_accuracy"] for run in old_runs]
        now = [r["test_accuracy"] for r in new if r["row"] == cell.row and r["col"] == cell.col]
        pooled = float(np.sqrt((np.var(old) + np.var(now)) / 2))
        diff = float(np.mean(now) - np.mean(old))
        rows.append(
            f"| {cell.row} | {cell.col} | {np.mean(old):.3f} ± {np.std(old):.3f} | {np.mean(now):.3f} ± "
            f"{np.std(now):.3f} | {diff:+.3f} | {pooled:.3f} | {abs(diff) / max(pooled, 1e-9):.1f} |"
        )
        recs += [{**r, "col": f"{r['col']} (batch)"} for r in new if r["row"] == cell.row and r["col"] == cell.col]
        recs += [
            {
                "row": cell.row,
                "col": f"{cell.col} (committed)",
                "seed": s,
                "test_accuracy": v,
                "device": run["meta"].get("device") or common.UNRECORDED_DEVICE,
            }
            for s, (v, run) in enumerate(zip(old, old_runs, strict=True))
        ]
    table = (
        "| rule | attack | committed (one program per run) | batch (one program per cell) | difference | "
        "pooled std | difference / pooled std |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    plot = common.plot_bars(args, recs or new, "spot_check.png", title="Committed single runs vs batches")
    body = f"{table}\n\n![spot check]({plot.name})"
    print(common.write_report(args, "Spot check: committed single runs vs today's batches", body, recs or new))


if __name__ == "__main__":
    main()
