"""The ``flagjax`` command line: ``flagjax demo`` (synthetic aggregation table)."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flagjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="aggregate synthetic gradients under attacks; print a table")
    demo.add_argument("--p", type=int, default=15, help="number of workers (default 15)")
    demo.add_argument("--d", type=int, default=20_000, help="gradient dimension (default 20000)")
    demo.add_argument("--max-f", type=int, default=4, help="largest Byzantine count (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
