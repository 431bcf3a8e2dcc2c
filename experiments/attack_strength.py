"""Attack strength on real gradients: per rule, the damage done by the adaptive ``autodiff`` attack (all f
rows optimised by gradient ascent through the rule) against the best of the line-search attacks it starts
from (optimal ALIE and optimal IPM against the same rule, min-max), under both of its objectives:
"distance" ||rule(stack) - honest mean|| and "cosine" -cos(rule(stack), honest mean) (-1: the aggregate
points along the honest mean, +1: against it). For the selection rules, also autodiff without its shrunk
starts (``shrink=()``), which measures what they add there.

The honest rows are the 12 honest workers' gradients of the main config (paper CNN, real Fashion-MNIST,
batch 32) captured at one step of a run trained with the mean and no attacker; f = 3 Byzantine rows are
added (p = 15). One stack, so no spread over seeds: the training runs of the heatmap are the
robustness result; this is how strong each attack is on the same input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import flagjax
from experiments import common
from flagjax import attacks

RULES = (
    "flag",
    "normalized_mean",
    "mean",
    "median",
    "trimmed_mean",
    "meamed",
    "geomed",
    "centered_clipping",
    "krum",
    "multi_krum",
    "bulyan",
    "nnm+multi_krum",
    "caf",
    "dnc",
)
SELECTION = ("krum", "multi_krum", "bulyan", "nnm+multi_krum")
F = 3


def capture(args) -> np.ndarray:
    """(12, d) honest per-worker gradients at the last step of a short mean-aggregated run without attackers."""
    base = common.base_config(args, num_workers=12, num_byzantine=0, attack="none", rule="mean")
    return common.capture_gradients(base, base.steps if args.quick else min(base.steps, 100))


def damage(rule, honest, byz, objective, key) -> float:
    out = np.asarray(flagjax.aggregate(rule, jnp.concatenate([honest, byz]), f=F, key=key), np.float64)
    m = np.asarray(honest, np.float64).mean(0)
    if objective == "distance":
        return float(np.linalg.norm(out - m))
    return float(-(out @ m) / (np.linalg.norm(out) * np.linalg.norm(m)))


def main(argv=None):
    args = common.parse_args("attack_strength", __doc__, argv)
    runs = common.store(args)
    honest = jnp.asarray(runs.cached("honest_gradients", lambda: capture(args).tolist()), jnp.float32)
    key = jax.random.key(0)
    # quick: one rule of each kind, leaving out FA, whose autodiff program is the slowest to compile (the
    # attack through FA is tested in tests/test_attacks.py)
    rules = ("normalized_mean", SELECTION[0]) if args.quick else RULES
    steps = 2 if args.quick else 30
    records, lines = [], []
    for rule in rules:
        for objective in ("distance", "cosine"):
            variants = {"autodiff": {}} | ({"autodiff, no shrunk starts": {"shrink": ()}} if rule in SELECTION else {})

            def compute(rule=rule, objective=objective, variants=variants):
                out = {}
                for name in ("optimal_alie", "optimal_ipm", "minmax"):
                    kw = {"rule": rule} if name != "minmax" else {}
                    out[name] = damage(rule, honest, attacks.attack(name, honest, f=F, key=key, **kw), objective, key)
                for label, kw in variants.items():
                    fn = jax.jit(
                        lambda h, kw=kw: attacks.attack(
                            "autodiff", h, f=F, key=key, rule=rule, objective=objective, steps=steps, **kw
                        )
                    )
                    out[label] = damage(rule, honest, fn(honest), objective, key)
                return out

            res = runs.cached(f"{rule}__{objective}__steps{steps}", compute)
            best = max(res[n] for n in ("optimal_alie", "optimal_ipm", "minmax"))
            line = f"| {rule} | {objective} | {best:.4f} | {res['autodiff']:.4f} | {res['autodiff'] - best:+.4f} |"
            line += f" {res['autodiff, no shrunk starts']:.4f} |" if "autodiff, no shrunk starts" in res else " — |"
            lines.append(line)
            for label, val in (("best line search", best), ("autodiff", res["autodiff"])):
                records.append({"row": label, "col": f"{rule}\n{objective}", "seed": 0, "damage": val})
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rules)), 4))
    for ax, objective in zip(axes, ("distance", "cosine"), strict=True):
        xs = np.arange(len(rules))
        for i, label in enumerate(("best line search", "autodiff")):
            vals = [r["damage"] for r in records if r["row"] == label and r["col"].endswith(objective)]
            ax.bar(xs - 0.2 + 0.4 * i, vals, 0.4, label=label)
        ax.set_xticks(xs, rules, rotation=60, fontsize=7, ha="right")
        ax.set_title(f"objective: {objective}", fontsize=9)
        ax.set_yscale("symlog" if objective == "distance" else "linear")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plot = common.save_figure(args, fig, "damage.png")
    body = "\n".join(
        [
            f"f = {F} Byzantine rows added to 12 captured honest gradients (d = {honest.shape[1]}); autodiff: "
            f"{steps} Adam steps (lr 0.05 of the honest coordinate spread), default starts. Higher is stronger "
            "(distance: farther from the honest mean; cosine: -1 = along the honest mean, +1 = against it).",
            "",
            "| rule | objective | best line search | autodiff | autodiff - best | autodiff without shrunk starts |",
            "|---|---|---|---|---|---|",
            *lines,
            "",
            f"![damage]({plot.name})",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    quick = " (QUICK smoke run on synthetic data: not a result)" if args.quick else ""
    text = (
        f"# Attack strength: autodiff against the line-search attacks{quick}\n\nProduced by:\n\n    "
        f"{common.command(args)}\n\nRan on: {common.device_name()}.\n\n{body}\n"
    )
    (args.out / "README.md").write_text(text)
    print(args.out / "README.md")


if __name__ == "__main__":
    main()
