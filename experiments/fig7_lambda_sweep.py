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

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from flagjax import train

LAMBDAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def vmapped_lambda_runs(base: train.TrainConfig, seeds: int, lambdas=LAMBDAS) -> list[dict]:
    """Train len(lambdas) * seeds FA models in one vmapped program; one record per model."""
    from flagjax import parallel

    cfg = dataclasses.replace(base, rule="flag", layout="server", num_devices=1)
    su = train.setup(cfg)
    raw_step, _, _ = parallel.build_step(
        su.model,
        su.tx,
        parallel.StepConfig(
            num_workers=cfg.num_workers,
            num_byzantine=cfg.num_byzantine,
            rule="flag",
            rule_hparams=tuple(sorted(cfg.rule_hparams.items())),
            attack=cfg.attack,
            attack_hparams=tuple(sorted(cfg.attack_hparams.items())),
            num_classes=su.dataset.num_classes,
        ),
        su.mesh,
        su.state.params,
        dynamic_hparams=("lam",),
        jit=False,
    )
    grid = [(lam, s) for lam in lambdas for s in range(seeds)]
    states = []
    for _, s in grid:
        init = train.setup(dataclasses.replace(cfg, seed=s), su.dataset).state
        states.append(init)
    # host (uncommitted) arrays: JAX 0.10's conv batching rule refuses mesh-committed operands
    state = jax.tree.map(lambda *a: np.stack([np.asarray(jax.device_get(v)) for v in a]), *states)
    lam = jnp.asarray([g[0] for g in grid], jnp.float32)
    step = jax.jit(jax.vmap(lambda st, x, y, lm: raw_step(st, x, y, {"lam": lm}), in_axes=(0, None, None, 0)))
    honest = cfg.num_workers - cfg.num_byzantine
    hist = [[] for _ in grid]
    t0 = time.perf_counter()
    for k in range(cfg.steps):
        idx = su.sampler.indices(k)  # plain host arrays: all models share the batch
        state, m = step(state, su.train_x[idx], su.train_y[idx], lam)
        m = jax.device_get(m)
        done = k + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            params = jax.device_get(state.params)
            for i in range(len(grid)):
                p_i = jax.tree.map(lambda a, i=i: a[i], params)
                tl, ta = train._evaluate(su.model, p_i, {}, su.dataset.test_x, su.dataset.test_y, cfg.eval_examples)
                hist[i].append(
                    {
                        "step": done,
                        "loss": float(np.mean(m["loss"][i][:honest])),
                        "test_accuracy": ta,
                        "test_loss": tl,
                        "wall_time": time.perf_counter() - t0,
                    }
                )
    return [
        {
            "row": f"flag λ={lam_:g}",
            "col": "accuracy",
            "seed": s,
            "test_accuracy": hist[i][-1]["test_accuracy"],
            "loss": hist[i][-1]["loss"],
            "wall_time": hist[i][-1]["wall_time"],
            "steps": cfg.steps,
            "history": hist[i],
        }
        for i, (lam_, s) in enumerate(grid)
    ]


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
