"""Paper Fig. 8: scalability, p = 15 / 30 / 60 with f = 3 / 6 / 12 augmented-data (Lotka-Volterra,
t = 0.006) workers and r = 8 / 16 / 32, as the authors' scripts did: accuracy and time per step."""

from experiments import common

SETTINGS = ((15, 3, 8), (30, 6, 16), (60, 12, 32))


def main(argv=None):
    args = common.parse_args("fig8_scalability", __doc__, argv)
    base = common.base_config(args, attack="lotka_volterra", aug_level=0.006)
    cells = []
    for p, f, r in SETTINGS:
        cells.append(
            common.Cell(
                "flag", f"p={p}", {"rule": "flag", "num_workers": p, "num_byzantine": f, "rule_hparams": {"r": r}}
            )
        )
        for rule in ("normalized_mean", "mean", "multi_krum"):
            cells.append(common.Cell(rule, f"p={p}", {"rule": rule, "num_workers": p, "num_byzantine": f}))
    recs = common.run_cells(args, cells, base, batch=False)  # time per step: one run per program
    title = "Fig. 8 — scalability (augmented-data workers)"
    body = common.accuracy_and_step_time(args, recs, title, log_every=base.log_every)
    print(common.write_report(args, title, body, recs))


if __name__ == "__main__":
    main()
