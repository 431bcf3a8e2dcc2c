"""Paper Fig. 7: the pairwise regulariser's weight lambda in {0, 1, 2, 4, 8, 16, 32, 64} at p = 7, f = 1
(uniform random), against Multi-Krum and Bulyan.

All lambda x seed models train in ONE compiled program: the step is vmapped over (state, lambda);
seeds differ in the model initialisation and the attack's randomness, and all models see the same
mini-batches. Multi-Krum and Bulyan are ordinary runs with the same seeds.
"""

from __future__ import annotations

import dataclasses
import json
import time

from experiments import common
from flagjax import train

LAMBDAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def vmapped_lambda_runs(base: train.TrainConfig, seeds: int, lambdas=LAMBDAS) -> list[dict]:
    """Train len(lambdas) * seeds FA models in one vmapped program; one record per model."""
    cfg = dataclasses.replace(base, rule="flag")
    grid = [{"seed": s, "lam": lam} for lam in lambdas for s in range(seeds)]
    return common.vmapped_runs(cfg, grid, label=lambda g: f"flag λ={g['lam']:g}")


def main(argv=None):
    args = common.parse_args("fig7_lambda_sweep", __doc__, argv)
    base = common.base_config(args, num_workers=7, num_byzantine=1)
    lambdas = LAMBDAS[:3] if args.quick else LAMBDAS
    t0 = time.time()
    recs = vmapped_lambda_runs(base, args.seeds, lambdas)
    sweep_seconds = time.time() - t0
    recs += common.run_cells(args, [common.Cell(r, "accuracy", {"rule": r}) for r in ("multi_krum", "bulyan")], base)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lambda_histories.json").write_text(
        json.dumps([{k: r[k] for k in ("row", "seed", "history")} for r in recs])
    )
    body = common.table(recs) + (
        f"\n\nThe {len(lambdas)} x {args.seeds} FA models trained as one vmapped program in {sweep_seconds:.0f} s "
        "(same mini-batches for all; seeds change the initialisation and the attack)."
    )
    print(common.write_report(args, "Fig. 7 — lambda sweep (p = 7, f = 1, random)", body, recs))


if __name__ == "__main__":
    main()
