"""Beyond the paper: rule x attack -> final accuracy, with the worst case over attacks per rule
(ALIE, IPM, their optimal versions against each rule, min-max, sign flip, random, Gaussian; f = 3 of 15).
Rows: FA; the paper's baselines (mean, median, trimmed mean, MeaMed, Phocas, Multi-Krum, Bulyan); the
modern baselines the reviewers asked for - the geometric median, centered clipping (from zero, and from
the previous aggregate with and without worker momentum), FA with worker momentum, and NNM
(nearest-neighbour mixing) in front of every rule but the centered clippings from the previous
aggregate; and the normalisation controls normalized_mean and clip+mean."""

from experiments import common

RULES = (
    "flag",
    "normalized_mean",
    "mean",
    "clip+mean",
    "median",
    "multi_krum",
    "nnm+multi_krum",
    "nnm+flag",
    "nnm+mean",
    "nnm+median",
    "nnm+normalized_mean",
    "geomed",
    "centered_clipping",
    "centered_clipping(tau=1)",
    "centered_clipping(tau=1) from previous",
    "nnm+centered_clipping(tau=1)",
    "nnm+clip+mean",
    "nnm+geomed",
    "nnm+centered_clipping",
    "centered_clipping(tau=1) from previous + worker momentum",
    "flag + worker momentum",
    "trimmed_mean",
    "meamed",
    "phocas",
    "bulyan",
    "nnm+trimmed_mean",
    "nnm+meamed",
    "nnm+phocas",
    "nnm+bulyan",
)
# rows that are a rule with non-default hyperparameters or training settings: label -> (rule, rule_hparams,
# training overrides). Centered clipping from zero with ByzFL's tau = 100 clips none of this CNN's honest
# gradients (norm ~1), only huge Byzantine rows, to 100x an honest one; tau = 1 with 3 iterations clips.
# "previous": centred on the previous step's aggregate (the optimal attacks simulate the rule with that
# center too). "+ worker momentum": each honest worker sends an EMA of its gradients (beta = 0.9) in place
# of the server's momentum - with the previous center, Karimireddy et al.'s full recipe.
_CC1 = {"tau": 1.0, "iters": 3}
_PREV = {**_CC1, "center": "previous"}
_WORKER_MOMENTUM = {"worker_momentum": 0.9, "momentum": 0.0}
VARIANTS = {
    "centered_clipping(tau=1)": ("centered_clipping", _CC1, {}),
    "centered_clipping(tau=1) from previous": ("centered_clipping", _PREV, {}),
    "nnm+centered_clipping(tau=1)": ("nnm+centered_clipping", _CC1, {}),
    "centered_clipping(tau=1) from previous + worker momentum": ("centered_clipping", _PREV, _WORKER_MOMENTUM),
    "flag + worker momentum": ("flag", {}, _WORKER_MOMENTUM),
}

ATTACKS = ("random", "gaussian", "signflip", "alie", "ipm", "optimal_alie", "optimal_ipm", "minmax")


def cells(rules=RULES, attacks=ATTACKS) -> list[common.Cell]:
    """The heatmap's cells (row label x attack) with their config overrides."""
    out = []
    for label in rules:
        rule, rule_hp, train_hp = VARIANTS.get(label, (label, {}, {}))
        for atk in attacks:
            hp = {"rule": rule, "attack": atk, **train_hp}
            if rule_hp:
                hp["rule_hparams"] = dict(rule_hp)
            if atk.startswith("optimal") or atk == "autodiff":  # the attacker knows the rule and its hparams
                hp["attack_hparams"] = {"rule": rule, **({"rule_hparams": dict(rule_hp)} if rule_hp else {})}
            out.append(common.Cell(label, atk, hp))
    return out


def main(argv=None):
    args = common.parse_args("attack_heatmap", __doc__, argv)
    base = common.base_config(args)
    recs = common.run_cells(args, cells(), base)
    plot = common.plot_heatmap(args, recs, "heatmap.png", title="Final test accuracy, f = 3 of 15")
    body = f"{common.table(recs, worst_case=True)}\n\n![heatmap]({plot.name})"
    print(common.write_report(args, "Rule x attack heatmap (f = 3 of 15)", body, recs))


if __name__ == "__main__":
    main()
