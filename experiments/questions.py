"""Reviewers' and users' questions: (a) f = 0, what robustness costs when nobody attacks; (b) the
sensitivity of FA to r in {1, 2, 4, 8, 15} at f = 3 (random); (c) Dirichlet non-iid shards
(alpha = 1, 0.1) at f = 3 (random); (d) worker momentum (beta = 0.9, in place of the server's
momentum) against ALIE at f = 3; (e) the released code's FA (one unweighted SVD, no IRLS reweighting:
``max_iters=0``, code output) against the converged flag median with the code output (the default)
and with the paper's output, under random and ALIE attackers at f = 3."""

from experiments import common

RULES = ("flag", "normalized_mean", "mean", "median", "multi_krum", "geomed")
# (e): the default "flag" is the converged flag median (IRLS to tolerance) with the code output
FA_VARIANTS = {
    "flag": {},
    "flag released (max_iters=0)": {"max_iters": 0},
    "flag converged, paper output": {"output": "paper"},
}


def main(argv=None):
    args = common.parse_args("questions", __doc__, argv)
    base = common.base_config(args)
    cells = [common.Cell(r, "f=0", {"rule": r, "num_byzantine": 0, "attack": "none"}) for r in RULES]
    cells += [common.Cell("flag", f"r={r}", {"rule": "flag", "rule_hparams": {"r": r}}) for r in (1, 2, 4, 8, 15)]
    for alpha in (1.0, 0.1):
        cells += [
            common.Cell(r, f"dirichlet {alpha}", {"rule": r, "shard": "dirichlet", "dirichlet_alpha": alpha})
            for r in RULES
        ]
    # worker momentum replaces the server's (Karimireddy et al. 2021): with both at 0.9 and lr 0.05 even
    # the mean diverges with no attacker at all
    cells += [
        common.Cell(
            r,
            "ALIE + worker momentum 0.9",
            {"rule": r, "attack": "alie", "worker_momentum": 0.9, "momentum": 0.0},
        )
        for r in RULES
    ]
    cells += [common.Cell(r, "ALIE", {"rule": r, "attack": "alie"}) for r in RULES]
    for name, hp in FA_VARIANTS.items():  # the default flag's ALIE cell is already in the list above
        cols = (("random", "random"), ("ALIE", "alie")) if hp else (("random", "random"),)
        cells += [common.Cell(name, col, {"rule": "flag", "attack": atk, "rule_hparams": hp}) for col, atk in cols]
    recs = common.run_cells(args, cells, base)
    plot = common.plot_bars(args, recs, "accuracy.png", title="Reviewers' questions (f = 3 of 15 unless stated)")
    body = f"{common.table(recs)}\n\n![accuracy]({plot.name})"
    print(common.write_report(args, "Reviewers' questions", body, recs))


if __name__ == "__main__":
    main()
