#!/bin/bash
# The GPU checks of one device session, as one script (run from the repository root on a GPU machine
# whose image has jax[cuda], flax, optax, chex, orbax-checkpoint, tqdm and matplotlib; nothing is installed).
#   OUT: where results.tgz goes.  QUICK=1: the benchmarks' --quick sizes (a dry run on CPU before a lease).
# Writes benchmarks/results/{train_step,aggregation_solver,aggregation_solver_cmdbuf}_gpu.md and packs them
# into $OUT/results.tgz. Every step has its own time limit, so one slow step cannot take the others' results
# with it; the whole script stays under 8 minutes of device time.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
Q=${QUICK:+--quick}
R=benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi (dry run?)"
$PY -c "import jax, flax, optax, chex, orbax.checkpoint; print('jax', jax.__version__, jax.devices())" || exit 1
# FA's solver against Multi-Krum (the p x p loop's latency), default XLA flags
timeout 150 $PY benchmarks/aggregation.py --suite solver $Q --out $R/aggregation_solver_gpu.md
# the same with while loops captured in CUDA graphs (command buffers), to see what launch latency is left
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE" \
    timeout 120 $PY benchmarks/aggregation.py --suite solver $Q --out $R/aggregation_solver_cmdbuf_gpu.md
# training steps: paper CNN and ResNet-18 on CIFAR shapes, FA (both solvers) against the mean
timeout 220 $PY benchmarks/train_step.py $Q --out $R/train_step_gpu.md
tar czf "${OUT:-.}/results.tgz" $R/*_gpu.md 2>/dev/null
ls -la "${OUT:-.}"
