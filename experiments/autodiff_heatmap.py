"""The heatmap's ``autodiff`` column: every row of experiments/attack_heatmap.py (f = 3 of 15, the main
config) trained against the adaptive attack that differentiates through the row's own defence
(``flagjax.attacks`` ``autodiff``: distance objective, 30 Adam steps from the best of optimal ALIE, optimal
IPM and min-max, each against the same defence and its hyperparameters). Kept in its own report and store so
the eight-attack heatmap stays as it was made; compare each row's value here with that row's worst case
there (experiments/results/attack_heatmap/README.md)."""

from experiments import attack_heatmap, common


def main(argv=None):
    args = common.parse_args("autodiff_heatmap", __doc__, argv)
    base = common.base_config(args)
    cells = attack_heatmap.cells(attacks=("autodiff",))
    for cell in cells:  # attack_hparams.* overrides on the command line (e.g. steps=N) reach every cell
        cell.overrides["attack_hparams"] = {**base.attack_hparams, **cell.overrides["attack_hparams"]}
    recs = common.run_cells(args, cells, base)
    plot = common.plot_bars(args, recs, "autodiff.png", title="Final test accuracy under autodiff, f = 3 of 15")
    body = f"{common.table(recs)}\n\n![autodiff]({plot.name})"
    print(common.write_report(args, "Heatmap column: the autodiff attack (f = 3 of 15)", body, recs))


if __name__ == "__main__":
    main()
