"""Paper Fig. 1: the mean is not robust. f = 0..3 of 15 workers send uniform-random U[0,1) gradients."""

from experiments import common


def main(argv=None):
    args = common.parse_args("fig1_mean_not_robust", __doc__, argv)
    base = common.base_config(args)
    cells = [
        common.Cell(rule, f"f={f}", {"rule": rule, "num_byzantine": f})
        for rule in ("mean", "flag", "normalized_mean")
        for f in (0, 1, 2, 3)
    ]
    recs = common.run_cells(args, cells, base)
    plot = common.plot_curves(
        args, recs, "accuracy.png", group=lambda r: f"{r['row']} {r['col']}", title="Fig. 1: uniform random attack"
    )
    body = common.table(recs) + f"\n\n![accuracy]({plot.name})"
    print(common.write_report(args, "Fig. 1 — the mean is not robust (random attack)", body, recs))


if __name__ == "__main__":
    main()
