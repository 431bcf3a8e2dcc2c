"""Move an experiment's per-run folders (``<results>/<name>/runs/<id>/{metrics.jsonl,run.json}`` and the
sweeps' ``runs/<id>.json`` caches) into its compact store ``<results>/<name>/runs.jsonl.gz``
(``experiments.common.RunStore``), then delete the folders. Incomplete logs (last step short of the
run's configured steps) are left out and reported, so the script would train them again.

    python -m experiments.compact_store [experiments/results/<name> ...]   # default: every experiment

``scripts/rebuild_reports.sh`` then re-runs each report's own command (the first lines of its README)
from the store and checks with git that README.md and records.json come out unchanged.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from experiments import common


def compact(folder: Path) -> tuple[int, int, list[str]]:
    """(runs stored, caches stored, ids left out) for one experiment folder."""
    runs_dir = folder / "runs"
    store = common.RunStore(folder / "runs.jsonl.gz")
    n_runs = n_cache = 0
    skipped = []
    for item in sorted(runs_dir.iterdir()):
        if item.is_file() and item.suffix == ".json":
            store.put(item.name, {"json": json.loads(item.read_text())}, save=False)
            n_cache += 1
            continue
        metrics = item / "metrics.jsonl"
        hist = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        meta = json.loads((item / "run.json").read_text()) if (item / "run.json").exists() else {}
        steps = meta.get("config", {}).get("steps")
        if not hist or (steps is not None and hist[-1]["step"] != steps):
            skipped.append(item.name)
            continue
        store.put(item.name, {"meta": meta, "history": hist}, save=False)
        n_runs += 1
    store.save()
    shutil.rmtree(runs_dir)
    return n_runs, n_cache, skipped


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folders = [Path(a) for a in argv] or sorted(p.parent for p in common.RESULTS.glob("*/runs"))
    for folder in folders:
        if not (folder / "runs").is_dir():
            print(f"{folder}: no runs/ folder, nothing to do")
            continue
        n_runs, n_cache, skipped = compact(folder)
        size = (folder / "runs.jsonl.gz").stat().st_size
        kb = size / 1e3
        print(f"{folder}: {n_runs} runs, {n_cache} cached sweeps -> runs.jsonl.gz ({kb:.0f} kB); left out: {skipped}")


if __name__ == "__main__":
    main()
