"""A batch of runs as one program against the same runs one program each, wall time including compilation.

Usage:
    python benchmarks/batch_runs.py [--quick] [--steps 200] [--out benchmarks/results/batch_runs.md]

The cell: the main config (experiments/configs/fashion_cnn.py: real Fashion-MNIST, paper CNN, p = 15,
f = 3 random, FA) for seeds 0, 1, 2 (``--quick``: synthetic data, an MLP, 20 steps). Four ways, each in a
fresh Python process (so nothing is compiled in memory beforehand), timed from the process's start to
its end (imports, data loading, compilation, training and evaluation):

* separate: ``flagjax train seed=S`` three times (three processes, one program each);
* batch: ``flagjax train seed=0,1,2`` (one process, one program for the three runs, vmapped);
* batch, one at a time: ``... seed=0,1,2 runs_vectorized=1`` (one program, the runs one after the
  other inside it: ``lax.map``), without the cache only;

each without the persistent compilation cache (today's default: every process compiles), with it cold
(an empty cache folder at the start: the first process compiles and writes, later separate runs load)
and warm (the same folder again: every program is loaded). The table gives the ratios of the totals in
this run; it also counts the compiled programs the full heatmap needs with batched seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report  # benchmarks/_report.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def _train(overrides: list[str], cache: str, out: str) -> float:
    """Seconds for one ``flagjax train`` process (imports to exit) with the given cache folder."""
    env = {**os.environ, "FLAGJAX_COMPILATION_CACHE": cache}  # "" = no persistent cache
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # only the cache under test (gpu_checks.sh sets this one)
    cmd = [sys.executable, "-m", "flagjax.cli", "train", *overrides, f"out_dir={out}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _heatmap_programs() -> tuple[int, int]:
    """(cells, runs) of the committed heatmap: one program per cell with batched seeds, one per run before."""
    sys.path.insert(0, str(ROOT))
    from experiments import attack_heatmap

    cells = len(attack_heatmap.RULES) * len(attack_heatmap.ATTACKS)
    return cells, 3 * cells


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="synthetic data, MLP, 20 steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        base = ["dataset=synthetic", "model=mlp", "steps=20", "eval_every=20"]
    else:
        base = ["--config", "experiments/configs/fashion_cnn.py", f"steps={args.steps}", f"eval_every={args.steps}"]
    seeds = (0, 1, 2)
    tmp = Path(tempfile.mkdtemp(prefix="flagjax-batch-bench-"))
    times = {}
    for cache_state in ("none", "cold", "warm"):
        for how in ("separate", "batch"):
            # cold: the first use of this folder; warm: the second
            cache = "" if cache_state == "none" else str(tmp / f"cache_{how}")
            if how == "separate":
                t = sum(_train([*base, f"seed={s}"], cache, str(tmp / f"{how}_{s}")) for s in seeds)
            else:
                t = _train([*base, "seed=" + ",".join(map(str, seeds))], cache, str(tmp / how))
            times[how, cache_state] = t
            print(f"{how} ({cache_state} cache): {t:.1f} s", flush=True)
    seq = _train([*base, "seed=" + ",".join(map(str, seeds)), "runs_vectorized=1"], "", str(tmp / "sequential"))
    print(f"batch, one at a time (no cache): {seq:.1f} s", flush=True)
    cells, runs = _heatmap_programs()
    sep_none = times["separate", "none"]
    cmd = " ".join(["python benchmarks/batch_runs.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# A batch of runs as one program vs one program per run",
        "",
        f"Produced by `{cmd}` on {platform.machine()}, {os.cpu_count()} CPU cores (JAX on CPU, 1 device).",
        "",
        f"Cell: {' '.join(base)}, seeds {list(seeds)}. Each entry is the wall time of fresh processes (imports, "
        "data, compilation, training, evaluation); `separate` is three `flagjax train seed=S` processes, "
        "`batch` one `flagjax train seed=0,1,2`.",
        "",
        "| | no cache (s) | cache cold (s) | cache warm (s) | / separate without cache: none, cold, warm |",
        "|---|---|---|---|---|",
    ]
    for how in ("separate", "batch"):
        t = [times[how, c] for c in ("none", "cold", "warm")]
        ratios = ", ".join(f"{v / sep_none:.2f}" for v in t)
        lines.append(f"| {how} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {ratios} |")
    lines.append(f"| batch, one at a time (`runs_vectorized=1`) | {seq:.1f} | | | {seq / sep_none:.2f}, , |")
    lines += [
        "",
        "batch / separate with the same cache state: "
        + ", ".join(f"{c} {times['batch', c] / times['separate', c]:.2f}" for c in ("none", "cold", "warm"))
        + ".",
        "",
        f"Compiled training programs for the full heatmap (29 rules x 8 attacks x 3 seeds): {runs} with one "
        f"program per run, {cells} with each cell's seeds as one batch (rule and attack change the program).",
    ]
    text = "\n".join(lines) + "\n"
    _report.save(text, args.out)
    print(text)


if __name__ == "__main__":
    main()
