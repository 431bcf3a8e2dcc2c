"""Paper Fig. 7: the pairwise regulariser's weight lambda in {0, 1, 2, 4, 8, 16, 32, 64} at p = 7, f = 1
(uniform random), against Multi-Krum and Bulyan.

All lambda x seed models train in ONE compiled program (``flagjax.train.train_and_evaluate`` with
``rule_hparams.lam`` and ``seed`` as batch axes); each model has its seed's data order, initialisation
and attack draws, as if trained alone. (The committed sweep was trained by the earlier vmapped sweep,
in which all models saw the same mini-batches; it is read back from the store.) Multi-Krum and
Bulyan are ordinary runs with the same seeds.
"""

from __future__ import annotations

import dataclasses
import json
import time

from experiments import common
from flagjax import train

LAMBDAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def lambda_runs(base: train.TrainConfig, seeds: int, lambdas=LAMBDAS) -> list[dict]:
    """Train len(lambdas) * seeds FA models as one program; one record per model."""
    cfg = dataclasses.replace(base, rule="flag")
    axes = {"lam": list(lambdas), "seed": list(range(seeds))}
    return common.batch_runs(cfg, axes, label=lambda g: f"flag λ={g['lam']:g}")


def _plot(args, recs):
    """Final test accuracy against lambda (mean and spread over seeds), the other rules as lines."""
    import numpy as np

    plt = common.pyplot()

    lams = sorted({r["lam"] for r in recs if "lam" in r})
    acc = [[r["test_accuracy"] for r in recs if r.get("lam") == lam] for lam in lams]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = np.arange(len(lams))
    ax.errorbar(xs, [np.mean(a) for a in acc], yerr=[np.std(a) for a in acc], marker="o", capsize=3, label="flag")
    for i, row in enumerate(dict.fromkeys(r["row"] for r in recs if "lam" not in r)):
        level = np.mean([r["test_accuracy"] for r in recs if r["row"] == row])
        ax.axhline(level, ls="--", lw=1, label=row, color=f"C{i + 1}")
    ax.set_xticks(xs, [f"{lam:g}" for lam in lams])
    ax.set_xlabel("λ")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Fig. 7: p = 7, f = 1 (random)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return common.save_figure(args, fig, "accuracy_vs_lambda.png")


def main(argv=None):
    args = common.parse_args("fig7_lambda_sweep", __doc__, argv)
    base = common.base_config(args, num_workers=7, num_byzantine=1)
    lambdas = LAMBDAS[:3] if args.quick else LAMBDAS
    # the sweep is kept in the store like run_cells' runs, so re-running the script only rebuilds the report
    cache = f"flag_lambda_sweep__seeds{args.seeds}__steps{base.steps}.json"

    def sweep_and_time():
        t0 = time.time()
        return {"records": lambda_runs(base, args.seeds, lambdas), "seconds": time.time() - t0, "own_batches": True}

    sweep = common.store(args).cached(cache, sweep_and_time)
    recs = sweep["records"]
    others = [common.Cell(r, "accuracy", {"rule": r}) for r in ("normalized_mean", "multi_krum", "bulyan")]
    recs += common.run_cells(args, others, base)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lambda_histories.json").write_text(
        json.dumps([{k: r[k] for k in ("row", "seed", "history")} for r in recs])
    )
    plot = _plot(args, recs)
    body = common.table(recs) + (
        f"\n\nThe {len(lambdas)} x {args.seeds} FA models trained as one vmapped program in "
        f"{sweep['seconds']:.0f} s "
        + (
            "(each model with its seed's own mini-batches, initialisation and attack draws)."
            if sweep.get("own_batches")
            else "(same mini-batches for all; seeds change the initialisation and the attack)."
        )
        + f"\n\n![accuracy against lambda]({plot.name})"
    )
    print(common.write_report(args, "Fig. 7 — lambda sweep (p = 7, f = 1, random)", body, recs))


if __name__ == "__main__":
    main()
