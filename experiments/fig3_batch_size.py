"""Paper Fig. 3: batch size 64 / 128 / 192 per worker at f = 3 of 15 (uniform random)."""

from experiments import common

RULES = ("flag", "normalized_mean", "mean", "median", "multi_krum", "bulyan")


def main(argv=None):
    args = common.parse_args("fig3_batch_size", __doc__, argv)
    base = common.base_config(args)
    sizes = (4, 8) if args.quick else (64, 128, 192)
    cells = [common.Cell(r, f"batch {b}", {"rule": r, "batch_size": b}) for r in RULES for b in sizes]
    recs = common.run_cells(args, cells, base)
    title = "Fig. 3 — batch size (f = 3 of 15, random)"
    plot = common.plot_bars(args, recs, "accuracy.png", title=title)
    print(common.write_report(args, title, f"{common.table(recs)}\n\n![accuracy]({plot.name})", recs))


if __name__ == "__main__":
    main()
