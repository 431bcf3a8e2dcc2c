"""Many workers with a sketched Gram matrix (issue #18): its error on real gradients, training with it,
and training with hundreds of workers.

    python -m experiments.scale --part error     # sketch error on captured gradients
    python -m experiments.scale --part train     # main config: exact vs sketched FA / Multi-Krum
    python -m experiments.scale --part large_p   # p = 60 / 128 / 256 workers, MLP: accuracy and step time

Each part writes ``experiments/results/scale/<part>/``.

* ``error``: honest per-worker gradients captured from a mean-aggregated run without attackers at
  step 100 (the MLP with p = 256 workers, d = 199,210: the target's setting; and the main config's
  paper CNN with p = 15); for each sketch width k in {256, 1024, 4096} and 5 sketch seeds: the rms
  error of the sketched cosines, FA's output cosine to exact FA (target >= 0.98 at p = 256), the mean
  sin^2 of the principal angles between FA's exact and sketched subspaces, and whether Multi-Krum's
  output (its selected set) is the exact one. Also, with the exact Gram matrix, FA's output cosine at
  smaller r to the default r (the knob when FA's p x p solve dominates). The gradients are captured
  again on every run (deterministic), never stored: only the measures are.
* ``train``: the main config (paper CNN, real Fashion-MNIST, 15 workers of which 3 Byzantine, 200
  steps, 3 seeds) with FA and Multi-Krum exact and sketched (k = 1024, 4096) under random workers (the
  main config's attack), ALIE and min-max, normalized_mean as the exact reference; and the
  ``sketch_null`` attack, which knows a sketch seed, against a defence that sketches with that seed and
  against the default, which draws a fresh seed from each round's key.
* ``large_p``: the MLP on Fashion-MNIST with p = 60, 128, 256 workers of which p / 5 ALIE attackers,
  100 steps, batch 16 per worker: the mean, FA and Multi-Krum exact and sketched (k = 1024); final
  accuracy and median time per step (one program per run, so the step time is the run's own).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flagjax
from experiments import common
from flagjax import aggregators, solver

PARTS = ("error", "train", "large_p")
KS = (256, 1024, 4096)
ERROR_SEEDS = 5


def capture(args, *, p: int, model: str, steps: int) -> np.ndarray:
    """(p, d) honest per-worker gradients at step ``steps`` of a mean-aggregated run without attackers."""
    base = common.base_config(args, model=model, num_workers=p, num_byzantine=0, attack="none", rule="mean")
    return common.capture_gradients(base, steps)


def _basis(G, info, r) -> np.ndarray:
    """(d, r') float64 orthonormal basis of FA's subspace span(X^T C) solved from ``info``'s Gram matrix
    (from a sketched Gram matrix X^T C is orthonormal only in the sketch's metric: re-orthonormalised
    here in d-space; columns past the rank dropped)."""
    C = solver.solve_gram(info.K, info.valid, r=r, pairwise=False)[0]
    Y = np.asarray(solver.unit_rows(G).T @ C, np.float64)
    Q, R = np.linalg.qr(Y)
    return Q[:, np.abs(np.diag(R)) > 1e-6 * np.abs(np.diag(R)).max()]


def exact_reference(G: jax.Array, f: int) -> dict:
    """What every sketch width and seed is compared with on the stack G (p, d): the exact Gram
    information, FA's exact output and subspace basis, and Multi-Krum's exact output."""
    info = solver.prepare_gram(G)
    return {
        "info": info,
        "fa": flagjax.aggregate("flag", G, f=f),
        "basis": _basis(G, info, aggregators.default_rank(G.shape[0])),
        "mk": flagjax.aggregate("multi_krum", G, f=f),
    }


def error_measures(G: jax.Array, k: int, seed: int, f: int, ref: dict) -> dict:
    """The sketch's error at width k and seed on the stack G (p, d), against ``ref``
    (:func:`exact_reference` of G)."""
    p = G.shape[0]
    sk_info = aggregators.basic.sketched_gram_info(G, k, seed=jnp.uint32(seed))
    off = ~np.eye(p, dtype=bool)
    cos_err = np.asarray(sk_info.K - ref["info"].K)[off]
    key = jax.random.key(0)
    fa_sk = flagjax.aggregate("flag", G, f=f, key=key, sketch=k, sketch_seed=seed)
    Ye, Ys = ref["basis"], _basis(G, sk_info, aggregators.default_rank(p))
    sv = np.linalg.svd(Ye.T @ Ys, compute_uv=False)  # cosines of the principal angles
    mk_sk = flagjax.aggregate("multi_krum", G, f=f, key=key, sketch=k, sketch_seed=seed)
    cos = lambda a, b: float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))  # noqa: E731
    return {
        "d": int(G.shape[1]),
        "cos_rms": float(np.sqrt(np.mean(cos_err**2))),
        "cos_max": float(np.abs(cos_err).max()),
        "fa_output_cosine": cos(ref["fa"], fa_sk),
        "fa_mean_sin2": float(1 - np.sum(sv**2) / max(Ye.shape[1], Ys.shape[1])),
        "fa_max_angle_deg": float(np.degrees(np.arccos(np.clip(sv.min(), -1, 1)))),
        "mk_same_output": bool(jnp.allclose(ref["mk"], mk_sk, rtol=1e-5, atol=1e-7)),
        "mk_output_cosine": cos(ref["mk"], mk_sk),
    }


def part_error(args) -> str:
    runs = common.store(args)
    stacks = [("mlp", 16)] if args.quick else [("mlp", 256), ("cnn", 15)]  # quick: one stack (test time)
    steps = 4 if args.quick else 100
    ks = (16, 64) if args.quick else KS
    seeds = 2 if args.quick else ERROR_SEEDS
    lines, curves = [], {}
    for model, p in stacks:
        f = p // 5
        G, ref = None, None
        results = {}
        for k in ks:
            for seed in range(seeds):
                rid = f"error2__{model}_p{p}__k{k}__seed{seed}__steps{steps}"
                if rid not in runs and G is None:
                    G = jnp.asarray(capture(args, p=p, model=model, steps=steps))
                if rid not in runs and ref is None:
                    ref = exact_reference(G, f)  # once per stack, only when a measure is missing
                results[(k, seed)] = runs.cached(
                    rid, lambda G=G, k=k, seed=seed, f=f, ref=ref: error_measures(G, k, seed, f, ref)
                )
        rid = f"error__{model}_p{p}__r__steps{steps}"
        if rid not in runs and G is None:
            G = jnp.asarray(capture(args, p=p, model=model, steps=steps))

        def r_sweep(G=G, p=p, f=f):
            ref = flagjax.aggregate("flag", G, f=f)
            out = {}
            for r in (64, 32, 16, 8):
                if r < aggregators.default_rank(p):
                    agg = flagjax.aggregate("flag", G, f=f, r=r)
                    out[str(r)] = float(jnp.dot(ref, agg) / (jnp.linalg.norm(ref) * jnp.linalg.norm(agg)))
            return out

        sweep = runs.cached(rid, r_sweep)
        d = results[(ks[0], 0)]["d"]
        lines += [
            f"### {model.upper()}, p = {p} workers (f = {f} for Multi-Krum), d = {d:,}",
            "",
            f"Mean over {seeds} sketch seeds (min / max in brackets where it matters).",
            "",
            "| k | cosine error rms | cosine error max | FA output cosine to exact FA | FA subspace mean sin^2 "
            "| FA largest principal angle | Multi-Krum output exact | Multi-Krum output cosine |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in ks:
            rs = [results[(k, s)] for s in range(seeds)]
            m = lambda key, rs=rs: np.mean([x[key] for x in rs])  # noqa: E731
            fa = [x["fa_output_cosine"] for x in rs]
            lines.append(
                f"| {k} | {m('cos_rms'):.4f} | {m('cos_max'):.3f} | {np.mean(fa):.4f} [{min(fa):.4f}, {max(fa):.4f}] "
                f"| {m('fa_mean_sin2'):.3f} | {m('fa_max_angle_deg'):.0f} deg "
                f"| {sum(x['mk_same_output'] for x in rs)} / {seeds} | {m('mk_output_cosine'):.5f} |"
            )
        curves[f"{model.upper()}, p = {p}"] = [
            (
                k,
                np.mean([results[(k, s)]["cos_rms"] for s in range(seeds)]),
                [results[(k, s)]["fa_output_cosine"] for s in range(seeds)],
            )
            for k in ks
        ]
        default_r = aggregators.default_rank(p)
        sweep_txt = ", ".join(f"r = {r}: {c:.4f}" for r, c in sweep.items()) or "none smaller than 8"
        lines += ["", f"Exact Gram, FA output cosine to the default r = {default_r}: {sweep_txt}.", ""]
    plot = _plot_error(args, curves)
    lines.append(f"![sketch error]({plot.name})")
    body = "\n".join(
        [
            f"Honest gradients of a mean-aggregated run without attackers at step {steps} (real Fashion-MNIST"
            f"{' — QUICK: synthetic data' if args.quick else ''}), batch 32 per worker. The count sketch's "
            "cosine error is about 1/sqrt(k) for nearly orthogonal rows (0.063 / 0.031 / 0.016 at k = 256 / "
            "1024 / 4096).",
            "",
            *lines,
        ]
    )
    return _write_text(args, "Sketch error on real gradients", body)


def _plot_error(args, curves: dict):
    """Cosine error rms against k (with 1/sqrt(k)) and FA's output cosine to exact FA against k."""
    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, pts in curves.items():
        ks = [c[0] for c in pts]
        a1.plot(ks, [c[1] for c in pts], marker="o", label=label)
        means = [np.mean(c[2]) for c in pts]
        lo = [m - min(c[2]) for m, c in zip(means, pts, strict=True)]
        hi = [max(c[2]) - m for m, c in zip(means, pts, strict=True)]
        a2.errorbar(ks, means, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ks = sorted({c[0] for pts in curves.values() for c in pts})
    a1.plot(ks, [1 / np.sqrt(k) for k in ks], "k--", lw=1, label="1 / sqrt(k)")
    a1.set(xscale="log", yscale="log", xlabel="sketch width k", ylabel="sketched cosine error (rms)")
    a2.axhline(0.98, color="grey", lw=1, ls=":", label="target 0.98")
    a2.set(xscale="log", xlabel="sketch width k", ylabel="FA output cosine to exact FA")
    for ax in (a1, a2):
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return common.save_figure(args, fig, "error.png")


def _write_text(args, title: str, body: str) -> str:
    quick = " (QUICK smoke run on synthetic data: not a result)" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    text = (
        f"# {title}{quick}\n\nProduced by:\n\n    {common.command(args)}\n\nRan on: {common.device_name()}.\n\n{body}\n"
    )
    path = args.out / "README.md"
    path.write_text(text)
    return str(path)


def part_train(args) -> str:
    base = common.base_config(args)
    cells = []
    attacks = {"random": {}, "alie": {}, "minmax": {}}
    for atk, hp in attacks.items():
        for rule in ("flag", "multi_krum"):
            for k in (0, 1024, 4096):
                row = f"{rule} {'exact' if k == 0 else f'k={k}'}"
                rh = {"sketch": k} if k else {}
                cells.append(
                    common.Cell(row, atk, {"rule": rule, "rule_hparams": rh, "attack": atk, "attack_hparams": hp})
                )
        cells.append(common.Cell("normalized_mean exact", atk, {"rule": "normalized_mean", "attack": atk}))
    null_hp = {"k": 1024, "seed": 7}
    for rule in ("flag", "multi_krum"):
        for col, rh in (
            ("sketch_null, seed known", {"sketch": 1024, "sketch_seed": 7}),
            ("sketch_null, fresh seed", {"sketch": 1024}),
        ):
            cells.append(
                common.Cell(
                    f"{rule} k=1024",
                    col,
                    {"rule": rule, "rule_hparams": rh, "attack": "sketch_null", "attack_hparams": null_hp},
                )
            )
    recs = common.run_cells(args, cells, base)
    plot = common.plot_bars(args, recs, "accuracy.png", title="Exact vs sketched Gram matrix (main config)")
    body = (
        common.table(recs)
        + "\n\n`k=...`: the rule's `sketch` width, its seed drawn from each round's key (the default). "
        "`sketch_null`: every Byzantine row has the honest mean's sketch (width 1024, seed 7) and norm and "
        "points away from it; 'seed known' is a defence sketching with that fixed `sketch_seed=7`, 'fresh seed' "
        f"the default.\n\n![accuracy]({plot.name})"
    )
    return str(common.write_report(args, "Training with a sketched Gram matrix", body, recs))


def part_large_p(args) -> str:
    base = common.base_config(args, model="mlp", attack="alie", batch_size=16, steps=100, eval_every=50, log_every=10)
    ps = (12, 24) if args.quick else (60, 128, 256)
    cells = []
    for p in ps:
        f = p // 5
        for row, rule, rh in (
            ("mean", "mean", {}),
            ("flag exact", "flag", {}),
            ("flag k=1024", "flag", {"sketch": 1024}),
            ("multi_krum exact", "multi_krum", {}),
            ("multi_krum k=1024", "multi_krum", {"sketch": 1024}),
        ):
            cells.append(
                common.Cell(row, f"p={p}", {"rule": rule, "rule_hparams": rh, "num_workers": p, "num_byzantine": f})
            )
    recs = common.run_cells(args, cells, base, batch=False)  # time per step: one run per program
    title = "Hundreds of workers (MLP, f = p/5 ALIE)"
    body = common.accuracy_and_step_time(args, recs, title, log_every=base.log_every, fmt="{:.0f}")
    return str(common.write_report(args, title, body, recs))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--part", choices=PARTS, required=True)
    known, rest = pre.parse_known_args(argv)
    args = common.parse_args("scale", __doc__, rest)
    args.argv = argv
    args.out = args.out / known.part
    path = {"error": part_error, "train": part_train, "large_p": part_large_p}[known.part](args)
    print(path)


if __name__ == "__main__":
    main()
