"""Paper Fig. 4: f = 3 of 15 workers drop 10% of their gradient's coordinates (zeroed)."""

from experiments import common

RULES = ("flag", "normalized_mean", *common.CLASSIC)


def main(argv=None):
    args = common.parse_args("fig4_drop", __doc__, argv)
    base = common.base_config(args, attack="drop")
    cells = [common.Cell(r, "drop 10%", {"rule": r}) for r in RULES]
    recs = common.run_cells(args, cells, base)
    print(common.write_report(args, "Fig. 4 — coordinate-drop workers (f = 3 of 15)", common.table(recs), recs))


if __name__ == "__main__":
    main()
