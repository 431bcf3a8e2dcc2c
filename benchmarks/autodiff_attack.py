"""Cost of the adaptive ``autodiff`` attack inside the training step, as a ratio to the same step under a
fixed attack (sign flipping, whose cost is one mean), for a few defences.

Usage:
    python benchmarks/autodiff_attack.py [--quick] [--out benchmarks/results/autodiff_attack.md]

Paper CNN, p = 15 workers of which f = 3 Byzantine, batch 32, synthetic 28 x 28 images, one device. The
autodiff attack runs its default 30 Adam steps, each one forward and backward pass through the defence, after
its starting points (optimal ALIE and optimal IPM, each a 32-point line search through the defence, and
min-max). Median step time after two warm-up steps, the setups timed round-robin
(``benchmarks/_timing.py``).
"""

from __future__ import annotations

import argparse
import os
import platform

import _report  # noqa: E402  # benchmarks/_report.py
import jax
from _timing import time_interleaved  # benchmarks/_timing.py

from flagjax import data, train

# the last three differentiate through the sorting network and NNM (their hand-written reverse-mode rules:
# flagjax/aggregators/coordinatewise.py)
RULES = ("mean", "multi_krum", "flag", "trimmed_mean", "nnm+trimmed_mean", "nnm+phocas")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    steps = 2 if args.quick else 6
    ds = data.synthetic_dataset(n_train=2000, n_test=200)
    rows = []
    for rule in RULES[:1] if args.quick else RULES:
        setups = {}
        for attack, hp in (("signflip", {}), ("autodiff", {"rule": rule, **({"steps": 2} if args.quick else {})})):
            cfg = train.TrainConfig(
                dataset="synthetic",
                model="cnn",
                num_workers=15,
                num_byzantine=3,
                attack=attack,
                attack_hparams=hp,
                rule=rule,
                batch_size=32,
                steps=1000,
                num_devices=1,
            )
            setups[attack] = train.setup(cfg, ds)
        t = time_interleaved(setups, steps)
        rows.append((rule, t["signflip"], t["autodiff"]))
        print(rule, {k: round(v, 1) for k, v in t.items()}, flush=True)
    cmd = "python benchmarks/autodiff_attack.py" + (" --quick" if args.quick else "")
    cmd += f" --out {args.out}" if args.out else ""
    lines = [
        "# The autodiff attack's cost per training step",
        "",
        f"Produced by `{cmd}` on {platform.machine()} with {os.cpu_count()} CPU cores, JAX {jax.__version__} "
        f"({jax.default_backend()}).",
        "",
        f"Paper CNN, p = 15, f = 3, batch 32; median of {steps} steps after 2 warm-up steps, round-robin.",
        "",
        "| defence | step with sign flipping (ms) | step with autodiff (ms) | ratio |",
        "|---|---|---|---|",
        *[f"| {r} | {a:.1f} | {b:.1f} | {b / a:.1f} |" for r, a, b in rows],
        "",
    ]
    text = "\n".join(lines)
    _report.save(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
