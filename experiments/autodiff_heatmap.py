"""The heatmap's ``autodiff`` column: every row of experiments/attack_heatmap.py (f = 3 of 15, the main
config) trained against the adaptive attack that differentiates through the row's own defence
(``flagjax.attacks`` ``autodiff``: distance objective, 30 Adam steps from the best of optimal ALIE, optimal
IPM and min-max, each against the same defence and its hyperparameters). Kept in its own report and store so
the eight-attack heatmap stays as it was made; the report's second table sets each row's value here beside
that row's worst case over the heatmap's eight attacks (read from experiments/results/attack_heatmap's
records) and gives the worst case recomputed with autodiff as a ninth attack."""

import json

import numpy as np

from experiments import attack_heatmap, common

HEATMAP_RECORDS = common.RESULTS / "attack_heatmap" / "records.json"


def worst_case_table(records: list[dict], heatmap: list[dict]) -> str:
    """Markdown table: per row of ``records`` (the autodiff runs), the heatmap's worst attack and its mean
    accuracy over seeds (from ``heatmap``, the eight-attack heatmap's records), the autodiff mean, and the
    worst case over all nine attacks. A row the heatmap lacks gets dashes."""

    def means(recs):
        vals: dict[tuple[str, str], list[float]] = {}
        for r in recs:
            if r.get("test_accuracy") is not None:
                vals.setdefault((r["row"], r["col"]), []).append(r["test_accuracy"])
        return {k: float(np.mean(v)) for k, v in vals.items()}

    ad, hm = means(records), means(heatmap)
    lines = [
        "| | worst of the 8 attacks | (attack) | autodiff | worst of 9 | worst case moved by |",
        "|---|---|---|---|---|---|",
    ]
    for row in dict.fromkeys(r["row"] for r in records):
        a = ad.get((row, "autodiff"))
        cols = {c: v for (rw, c), v in hm.items() if rw == row}
        if a is None:
            continue
        if not cols:
            lines.append(f"| {row} | — | — | {a:.3f} | — | — |")
            continue
        atk = min(cols, key=cols.get)
        w8 = cols[atk]
        w9 = min(w8, a)
        lines.append(f"| {row} | {w8:.3f} | {atk} | {a:.3f} | {w9:.3f} | {w9 - w8:+.3f} |")
    return "\n".join(lines)


def main(argv=None):
    args = common.parse_args("autodiff_heatmap", __doc__, argv)
    base = common.base_config(args)
    cells = attack_heatmap.cells(attacks=("autodiff",))
    for cell in cells:  # attack_hparams.* overrides on the command line (e.g. steps=N) reach every cell
        cell.overrides["attack_hparams"] = {**base.attack_hparams, **cell.overrides["attack_hparams"]}
    recs = common.run_cells(args, cells, base)
    plot = common.plot_bars(args, recs, "autodiff.png", title="Final test accuracy under autodiff, f = 3 of 15")
    heatmap = json.loads(HEATMAP_RECORDS.read_text()) if HEATMAP_RECORDS.exists() else []
    body = (
        f"{common.table(recs)}\n\n![autodiff]({plot.name})\n\n"
        "## Worst case recomputed\n\n"
        "Mean final test accuracy over seeds. The eight attacks' values are the committed heatmap's "
        "(experiments/results/attack_heatmap, same config and seeds, trained separately); a row falls when "
        "autodiff is below its worst of the eight.\n\n"
        f"{worst_case_table(recs, heatmap)}"
    )
    print(common.write_report(args, "Heatmap column: the autodiff attack (f = 3 of 15)", body, recs))


if __name__ == "__main__":
    main()
