"""Paper Fig. 4: f = 3 of 15 workers drop 10% of their gradient's coordinates (zeroed)."""

from experiments import common

RULES = ("flag", "normalized_mean", *common.CLASSIC)


def main(argv=None):
    args = common.parse_args("fig4_drop", __doc__, argv)
    base = common.base_config(args, attack="drop")
    cells = [common.Cell(r, "drop 10%", {"rule": r}) for r in RULES]
    recs = common.run_cells(args, cells, base)
    title = "Fig. 4 — coordinate-drop workers (f = 3 of 15)"
    plot = common.plot_bars(args, recs, "accuracy.png", title=title)
    curves = common.plot_curves(args, recs, "curves.png", group=lambda r: r["row"], title=title)
    body = f"{common.table(recs)}\n\n![accuracy]({plot.name})\n\n![curves]({curves.name})"
    print(common.write_report(args, title, body, recs))


if __name__ == "__main__":
    main()
