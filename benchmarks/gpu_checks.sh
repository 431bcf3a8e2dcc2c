#!/bin/bash
# The GPU checks of one device session, as one script (run from the repository root on a GPU machine
# whose image has jax[cuda], flax, optax, chex, orbax-checkpoint, tqdm and matplotlib; nothing is installed).
#   OUT: where results.tgz goes.  QUICK=1: the benchmarks' --quick sizes (a dry run on CPU before a lease).
# Writes benchmarks/results/{solver_latency,aggregation_solver,train_step,sketch}_gpu.md and packs them
# into $OUT/results.tgz. Every step has its own time limit, so one slow step cannot take the others' results
# with it; the whole script stays under 8 minutes of device time.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
Q=${QUICK:+--quick}
R=benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi (dry run?)"
$PY -c "import jax, flax, optax, chex, orbax.checkpoint; print('jax', jax.__version__, jax.devices())" || exit 1
# FA's default solver dispatch on this GPU: the kernel runs under jit, vmap, a batch of runs and both layouts
timeout 90 $PY benchmarks/gpu_smoke.py 2>&1 | tee $R/gpu_smoke_gpu.txt
# where the p x p solver's time goes (and whether the one-kernel Pallas solver lowers and agrees here)
timeout 60 $PY benchmarks/solver_latency.py --out $R/solver_latency_gpu.md
# FA's solver against Multi-Krum (the p x p loop's latency)
timeout 130 $PY benchmarks/aggregation.py --suite solver $Q --out $R/aggregation_solver_gpu.md
# training steps: paper CNN and ResNet-18 on CIFAR shapes, FA (both solvers) against the mean
timeout 150 $PY benchmarks/train_step.py $Q --out $R/train_step_gpu.md
# many workers: the sketched Gram matrix (the gather path) against the exact one, and the cost model
timeout 60 $PY benchmarks/sketch.py $Q --out $R/sketch_gpu.md
tar czf "${OUT:-.}/results.tgz" $R/*_gpu.md $R/gpu_smoke_gpu.txt 2>/dev/null
ls -la "${OUT:-.}"
