"""Paper Fig. 6: f = 3 of 15 workers train on augmented data (Lotka-Volterra pixel flow at t = 0.002,
0.006, 0.010; additive Gaussian noise sigma = 0.5, 1.0) instead of sending crafted gradients."""

from experiments import common

RULES = ("flag", "normalized_mean", "mean", "median", "multi_krum")
SETTINGS = {
    "LV t=0.002": {"attack": "lotka_volterra", "aug_level": 0.002},
    "LV t=0.006": {"attack": "lotka_volterra", "aug_level": 0.006},
    "LV t=0.010": {"attack": "lotka_volterra", "aug_level": 0.010},
    "noise 0.5": {"attack": "noise", "aug_level": 0.5},
    "noise 1.0": {"attack": "noise", "aug_level": 1.0},
}


def main(argv=None):
    args = common.parse_args("fig6_augmented", __doc__, argv)
    base = common.base_config(args)
    cells = [common.Cell(rule, name, {"rule": rule, **hp}) for rule in RULES for name, hp in SETTINGS.items()]
    recs = common.run_cells(args, cells, base)
    title = "Fig. 6 — augmented-data workers (f = 3 of 15)"
    plot = common.plot_bars(args, recs, "accuracy.png", title=title)
    body = f"{common.table(recs, worst_case=True)}\n\n![accuracy]({plot.name})"
    print(common.write_report(args, title, body, recs))


if __name__ == "__main__":
    main()
