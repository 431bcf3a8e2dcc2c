#!/usr/bin/env bash
# Rebuild every experiment report from its compact store (experiments/results/<name>/runs.jsonl.gz) with
# the command at the top of its README, then check that README.md and records.json did not change.
# No run is trained: every run the commands need is in the store (a missing one would be trained and the
# check would show the changed report). Usage: bash scripts/rebuild_reports.sh  (from the repository root)
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
  ${cmd/python/$PY} > /dev/null
done
git diff --stat --exit-code -- 'experiments/results/*/README.md' 'experiments/results/*/records.json'
echo "every report rebuilt unchanged from its store"
