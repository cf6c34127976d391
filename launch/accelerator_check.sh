#!/usr/bin/env bash
# The accelerator check (simclr_jax/tools/accelerator_check.py): correctness,
# ResNet-50 step speed, the PyTorch peer, gradient caching at batch 8192 and
# on-device augmentation, in at most 8 minutes on one GPU/TPU host.
#
#   launch/accelerator_check.sh OUT_DIR            # on the accelerator
#   launch/accelerator_check.sh OUT_DIR --smoke    # toy sizes, any CPU
#
# Runs from a plain checkout: no `pip install` of the project and no
# TensorFlow. It needs jax (with the accelerator's plugin), flax, optax,
# orbax-checkpoint, absl-py, PyYAML and ml-collections; torch for the peer
# stage. A machine without network takes ml-collections as a carried wheel
# in .whl/ at the repository root (ignored by git), which goes straight on
# PYTHONPATH (a pure-Python wheel is importable as a zip). Fetch it where pip
# reaches the index:
#   python3 -m pip download --no-deps -d .whl ml-collections==1.1.0
#
# Writes OUT_DIR/accelerator_check.json and .md after every stage.
# Settings (each can be overridden from the environment):
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  JAX's share of GPU memory (default 0.75
#       leaves a quarter idle; the grad-cache stage wants the largest batch).
#   JAX_COMPILATION_CACHE_DIR=OUT_DIR/jax_cache  persistent compilation cache,
#       so a rerun in the same window skips compiling.
#   XLA_FLAGS on GPU: the latency-hiding scheduler (overlaps collectives with
#       compute) and autotuning level 4 (cuDNN/cuBLAS algorithm search).
#   BUDGET_S=480  wall-clock budget for all stages.
set -uo pipefail
usage='usage: launch/accelerator_check.sh OUT_DIR [--smoke] [benchmark flags]'
out=${1:?$usage}
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
for wheel in "$repo"/.whl/ml_collections-*.whl; do
  [[ -e "$wheel" ]] && PYTHONPATH="$PYTHONPATH:$wheel"
done
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}
if command -v nvidia-smi >/dev/null 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_autotune_level=4"
fi
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
budget=${BUDGET_S:-480}
# The stages share the budget; the hard limit adds a minute for start-up.
exec timeout $((budget + 60)) "$python" -m simclr_jax.benchmark \
  --suite=accelerator --output_dir="$out" --budget_s="$budget" "$@"
