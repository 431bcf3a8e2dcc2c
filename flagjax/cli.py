"""The ``flagjax`` command line.

* ``flagjax demo``: aggregate synthetic gradients under attacks and print a table (seconds).
* ``flagjax train [--config FILE] [field=value ...]``: a training run (metrics JSON lines, checkpoints,
  plot), or a batch of runs trained as one program when fields take several values
  (``seed=0,1,2 lr=0.01,0.05``: the product, one folder per run under ``out_dir``). Overrides may
  come before or after the flags. Multi-process: ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the
  FLAGJAX_COORDINATOR / FLAGJAX_NUM_PROCESSES / FLAGJAX_PROCESS_ID environment variables).
* ``flagjax compare [--rules flag,mean,multi_krum] [field=value ...]``: the main job; the same run with
  several rules, an accuracy table and a plot.

Invalid configuration, unknown names and missing data exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if not (np.isfinite(na) and np.isfinite(nb)) or na == 0 or nb == 0:
        return float("nan")
    return float(np.dot(a, b) / (na * nb))


def demo_rows(*, p: int = 15, d: int = 20_000, seed: int = 0, max_f: int = 4, rules=("mean", "flag")):
    """Synthetic aggregation experiment used by ``flagjax demo`` (returns rows and FA's ratios).

    Honest worker i sends s + n_i with a shared signal s ~ N(0, I) and noise n_i ~ N(0, I) (so
    honest rows have cosine ~0.5 to each other and ~0.7 to their mean); f rows are replaced by an
    attack. Reports, per (attack, f, rule), the cosine to the honest mean and the relative error
    ||agg - m|| / ||m|| where m is the honest mean (for ``flag`` with the default "code" output, whose
    scale is ~unit by design, the relative error is measured after the best rescaling c*agg).
    """
    import jax

    import flagjax
    from flagjax import attacks

    rng = np.random.default_rng(seed)
    signal = rng.normal(size=d).astype(np.float32)
    noise = rng.normal(size=(p, d)).astype(np.float32)
    honest_all = signal[None] + noise
    agg_fns = {name: jax.jit(lambda g, name=name: flagjax.aggregate(name, g, f=0)) for name in rules}
    rows = []
    ratios = None
    for atk in ("random", "reverse", "gaussian", "collude"):
        for f in range(0, max_f + 1):
            honest = honest_all[: p - f]
            m = honest.mean(0)
            key = jax.random.key(seed * 1000 + f)
            byz = np.asarray(attacks.attack(atk, honest, f=f, key=key)) if f else np.zeros((0, d))
            stack = np.concatenate([honest, byz]).astype(np.float32)
            for name in rules:
                agg = np.asarray(agg_fns[name](stack))
                c = _cos(agg, m)
                scale = np.dot(agg, m) / max(np.dot(agg, agg), 1e-30) if name == "flag" else 1.0
                rel = float(np.linalg.norm(scale * agg - m) / np.linalg.norm(m))
                rows.append({"attack": atk, "f": f, "rule": name, "cosine": c, "rel_error": rel})
            if atk == "random" and f == max_f:
                _, info = flagjax.aggregators.flag_with_info(stack)
                ratios = np.asarray(info.ratios)
    return rows, ratios


def _demo(args) -> int:
    rows, ratios = demo_rows(p=args.p, d=args.d, seed=args.seed, max_f=args.max_f)
    print(f"flagjax demo: p={args.p} workers, d={args.d}, honest = shared signal + noise")
    print("cosine to the honest mean / relative error (flag: after best rescaling)\n")
    rules = sorted({r["rule"] for r in rows}, key=["mean", "flag"].index)
    header = f"{'attack':<10}{'f':>3}  " + "  ".join(f"{r + ' cos':>10}{r + ' err':>10}" for r in rules)
    print(header)
    print("-" * len(header))
    by = {(r["attack"], r["f"], r["rule"]): r for r in rows}
    for atk, f in dict.fromkeys((r["attack"], r["f"]) for r in rows):
        cells = "  ".join(f"{by[atk, f, r]['cosine']:>10.3f}{by[atk, f, r]['rel_error']:>10.3g}" for r in rules)
        print(f"{atk:<10}{f:>3}  {cells}")
    print(f"\nFA reconstruction ratios, attack=random, f={args.max_f} (last {args.max_f} are Byzantine):")
    print("  " + " ".join(f"{v:.2f}" for v in ratios))
    return 0


def _distributed(args) -> None:
    import os

    coord = args.coordinator or os.environ.get("FLAGJAX_COORDINATOR")
    if not coord:
        return
    import jax

    nproc = args.num_processes or int(os.environ.get("FLAGJAX_NUM_PROCESSES", "0"))
    pid = args.process_id if args.process_id is not None else int(os.environ.get("FLAGJAX_PROCESS_ID", "-1"))
    if nproc < 1 or not 0 <= pid < nproc:
        raise ValueError("multi-process runs need --num-processes N >= 1 and --process-id in [0, N)")
    jax.distributed.initialize(
        coordinator_address=coord,
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)

    def on_step(step, rec):
        bar.n = step
        post = {"loss": f"{rec['loss']:.3f}"}
        if "test_accuracy" in rec:
            post["test_acc"] = f"{rec['test_accuracy']:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return bar, on_step


def _train(args) -> int:
    import jax

    from flagjax import train

    _distributed(args)
    cfg = train.apply_overrides(train.load_config(args.config), args.overrides)
    cfg.validate()
    main = jax.process_index() == 0
    bar, on_step = _progress(cfg.steps, f"{cfg.rule} | {cfg.attack} f={cfg.num_byzantine}")
    if not main:
        bar.disable = True
    try:
        results = train.train_and_evaluate(cfg, on_step=on_step)
    except Exception as err:  # noqa: BLE001
        if jax.process_count() == 1 or isinstance(err, (ValueError, KeyError, FileNotFoundError)):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"flagjax train: error: process {jax.process_index()} of {jax.process_count()} stopped: a peer process "
            f"failed or became unreachable ({type(err).__name__}: {first[:300]})",
            file=sys.stderr,
        )
        return 1
    finally:
        bar.close()
    if main:
        if results[0].layout_note:
            print(f"note: layout 'sharded' fell back to 'server': {results[0].layout_note}")
        curves = {(f"{cfg.rule} {r.name}" if r.name else cfg.rule): r.history for r in results}
        plot = train.plot_accuracy(curves, f"{cfg.out_dir}/accuracy.png", cfg.rule)
        if len(results) > 1:
            print(f"{len(results)} runs trained as one program:")
        for res in results:
            fin = res.final
            label = f"{cfg.rule} {res.name}" if res.name else cfg.rule
            print(
                f"{label}: test accuracy {fin.get('test_accuracy', float('nan')):.4f} after {fin['step']} steps "
                f"({fin['wall_time']:.1f} s); metrics {res.metrics_path}"
            )
        print(f"plot {plot}")
    return 0


def _compare(args) -> int:
    import json
    from pathlib import Path

    import jax

    from flagjax import train

    _distributed(args)
    base = train.apply_overrides(train.load_config(args.config), args.overrides)
    rules = [r for r in args.rules.split(",") if r]
    root = Path(base.out_dir)
    results, rows = {}, []
    main = jax.process_index() == 0
    for rule in rules:
        cfg = train.apply_overrides(base, [f"rule={rule}", f"out_dir={root / rule.replace('+', '_')}"])
        cfg.validate()
        bar, on_step = _progress(cfg.steps, f"{rule:>12}")
        if not main:
            bar.disable = True
        res = train.run(cfg, on_step=on_step)
        bar.close()
        results[rule] = res.history
        fin = res.final
        rows.append(
            {
                "rule": rule,
                "test_accuracy": fin.get("test_accuracy"),
                "best_test_accuracy": max(h["test_accuracy"] for h in res.history if "test_accuracy" in h),
                "final_loss": fin["loss"],
                "seconds": fin["wall_time"],
                "mean_step_ms": 1e3 * fin["wall_time"] / max(fin["step"], 1),
            }
        )
        if main:
            print(f"  {rule}: test accuracy {fin.get('test_accuracy', float('nan')):.4f} ({fin['wall_time']:.0f} s)")
    if not main:
        return 0
    title = (
        f"{base.dataset} {base.model}, p={base.num_workers}, f={base.num_byzantine} ({base.attack}), "
        f"{base.steps} steps x {base.batch_size}/worker"
    )
    plot = train.plot_accuracy(results, root / "accuracy.png", title)
    (root / "summary.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    print(f"\n{title}")
    print(f"{'rule':<16}{'final test acc':>15}{'best test acc':>15}{'final loss':>12}{'s/run':>8}")
    for r in rows:
        print(
            f"{r['rule']:<16}{r['test_accuracy']:>15.4f}{r['best_test_accuracy']:>15.4f}"
            f"{r['final_loss']:>12.4f}{r['seconds']:>8.0f}"
        )
    print(f"\nplot: {plot}\nsummary: {root / 'summary.json'}; per-run metrics under {root}/<rule>/metrics.jsonl")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="Python config file defining get_config()")
    p.add_argument("overrides", nargs="*", help="field=value overrides (e.g. rule=flag num_byzantine=3)")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator HOST:PORT")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--init-timeout", type=int, default=60, help="seconds to wait for all processes")
    p.add_argument("--heartbeat-timeout", type=int, default=20, help="seconds before a lost peer is fatal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flagjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="aggregate synthetic gradients under attacks; print a table")
    demo.add_argument("--p", type=int, default=15, help="number of workers (default 15)")
    demo.add_argument("--d", type=int, default=20_000, help="gradient dimension (default 20000)")
    demo.add_argument("--max-f", type=int, default=4, help="largest Byzantine count (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    tr = sub.add_parser("train", help="one training run")
    _add_run_args(tr)
    tr.set_defaults(func=_train)
    cmp_ = sub.add_parser("compare", help="the main job: several rules on the same run, a table and a plot")
    cmp_.add_argument("--rules", default="flag,mean,multi_krum", help="comma-separated rule specs")
    _add_run_args(cmp_)
    cmp_.set_defaults(func=_compare)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # field=value overrides may come before, between or after the flags: argparse takes the first run
    # of positionals only, so the later ones come back as "unknown" and are appended here
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"flagjax {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
