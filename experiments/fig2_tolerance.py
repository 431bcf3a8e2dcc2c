"""Paper Fig. 2 (+ Fig. 9 time to accuracy): tolerance to f = 1, 2, 3 of 15 uniform-random workers,
FA against the classic rules, with the normalised-mean ablation (issue: controls) and clipped mean."""

from experiments import common

RULES = ("flag", "normalized_mean", *common.CLASSIC, "clip+mean")


def main(argv=None):
    args = common.parse_args("fig2_tolerance", __doc__, argv)
    base = common.base_config(args)
    cells = [common.Cell(rule, f"f={f}", {"rule": rule, "num_byzantine": f}) for rule in RULES for f in (1, 2, 3)]
    # Fig. 9 reports wall time per run, which a batch of seeds would share: one run per program
    recs = common.run_cells(args, cells, base, batch=False)
    f3 = [r for r in recs if r["col"] == "f=3"]
    p1 = common.plot_curves(args, f3, "accuracy_f3.png", group=lambda r: r["row"], title="Fig. 2: f = 3 random")
    p2 = common.plot_curves(
        args, f3, "time_to_accuracy_f3.png", group=lambda r: r["row"], title="Fig. 9: f = 3", x="wall_time"
    )
    body = (
        common.table(recs, worst_case=True)
        + f"\n\nMean wall time per run (s):\n\n{common.table(recs, value='wall_time', fmt='{:.0f}')}"
        + f"\n\n![accuracy]({p1.name})\n\n![time to accuracy]({p2.name})"
    )
    print(common.write_report(args, "Fig. 2 / Fig. 9 — tolerance to uniform-random workers", body, recs))


if __name__ == "__main__":
    main()
