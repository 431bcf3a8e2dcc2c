#!/usr/bin/env bash
# Rebuild every experiment report from its compact store (experiments/results/<name>/runs.jsonl.gz) with
# the command at the top of its README, then check that README.md and records.json did not change.
# No run is trained: FLAGJAX_EXPERIMENTS_READ_ONLY=1 makes a run missing from the store an error. Usage: bash scripts/rebuild_reports.sh  (from the repository root)
set -euo pipefail
PY=${PY:-.venv/bin/python}
for readme in experiments/results/*/README.md; do
  dir=$(dirname "$readme")
  cmd=$(sed -n '5p' "$readme" | sed 's/^ *//')
  case "$cmd" in
    "python -m experiments."*) ;;
    *) echo "skip $dir: no command on line 5"; continue ;;
  esac
  echo "== $cmd"
  FLAGJAX_EXPERIMENTS_READ_ONLY=1 ${cmd/python/$PY} > /dev/null 2>&1
done
git diff --stat --exit-code -- 'experiments/results/*/README.md' 'experiments/results/*/records.json'
echo "every report rebuilt unchanged from its store"
