"""Paper Fig. 5: fixed f = 2 (uniform random) with p = 11, 13, 15 workers."""

from experiments import common

RULES = ("flag", "normalized_mean", *common.CLASSIC)


def main(argv=None):
    args = common.parse_args("fig5_num_workers", __doc__, argv)
    base = common.base_config(args, num_byzantine=2)
    cells = [common.Cell(r, f"p={p}", {"rule": r, "num_workers": p}) for r in RULES for p in (11, 13, 15)]
    recs = common.run_cells(args, cells, base)
    title = "Fig. 5 — number of workers at f = 2 (random)"
    plot = common.plot_bars(args, recs, "accuracy.png", title=title)
    print(common.write_report(args, title, f"{common.table(recs)}\n\n![accuracy]({plot.name})", recs))


if __name__ == "__main__":
    main()
