#!/bin/bash
# The GPU checks of one device session, as one script (run from the repository root on a GPU machine
# whose image has jax[cuda], flax, optax, chex, orbax-checkpoint, tqdm and matplotlib; nothing is installed).
#   FLAGJAX_DATA_DIR: folder with the Fashion-MNIST IDX files (for Fig. 3); OUT: where results.tgz goes.
# Writes benchmarks/results/{train_step,aggregation,batch_runs}_gpu.md and experiments/results/fig3_batch_size/,
# then packs them into $OUT/results.tgz. Every step has its own time limit, so one slow step cannot
# take the others' results with it.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, optax, chex, orbax.checkpoint; print('jax', jax.__version__, jax.devices())" || exit 1
timeout 100 $PY benchmarks/train_step.py --out benchmarks/results/train_step_gpu.md
timeout 150 $PY benchmarks/aggregation.py --suite all --out benchmarks/results/aggregation_gpu.md
timeout ${BATCH_SECONDS:-240} $PY benchmarks/batch_runs.py --out benchmarks/results/batch_runs_gpu.md
timeout ${FIG3_SECONDS:-200} $PY -m experiments.fig3_batch_size --seeds 3 \
    --rows flag,normalized_mean,multi_krum,median,bulyan 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -25
tar czf "${OUT:-.}/results.tgz" benchmarks/results/*_gpu.md experiments/results/fig3_batch_size 2>/dev/null
ls -la "${OUT:-.}"
