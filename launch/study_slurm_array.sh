#!/usr/bin/env bash
# A scaling study as a Slurm array job: one array task per point of the grid,
# each an ordinary run of the main command (simclr_jax/tools/study.py).
#
#   # 1. Fix the grid once (writes STUDY/study_spec.json, lists the points):
#   python -m simclr_jax.study --config=configs/imagenet_resnet50.py \
#       --workdir=/shared/studies/bs --sweep=batch_size=256,512,1024,2048,4096 \
#       --sweep=num_epochs=100,200 --plan
#   # 2. One task per point (10 points: indices 0-9):
#   sbatch --array=0-9 launch/study_slurm_array.sh /shared/studies/bs
#   # 3. When they are done (or any time, for progress):
#   python -m simclr_jax.study --report=/shared/studies/bs
#
# Each task runs `python -m simclr_jax.study --workdir=STUDY --point=K`.
# A requeued or re-submitted task skips a finished point and resumes an
# interrupted one, so resubmitting the whole array after a preemption is
# safe. STUDY must be on a filesystem every node sees. One task here is one
# node with 8 GPUs; edit the #SBATCH lines (a multi-node point would use
# launch/slurm_gpu.sh's pattern instead). Install with pip install -e '.[cuda]'.
#SBATCH --job-name=simclr-study
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
usage='usage: sbatch --array=0-N launch/study_slurm_array.sh STUDY_DIR'
study=${1:?$usage}
point=${SLURM_ARRAY_TASK_ID:?run under sbatch --array}
export SIMCLR_JAX_REQUIRE_ACCELERATOR=1
# exec: Slurm's SIGTERM reaches the study, which forwards it to the point.
exec "${PYTHON:-python}" -m simclr_jax.study --workdir="$study" --point="$point"
