#!/usr/bin/env bash
# Multi-node GPU pretraining under Slurm: one process per GPU, all running the
# same command; they find each other through a coordinator on the job's first
# node.
#
#   sbatch launch/slurm_gpu.sh CONFIG WORKDIR [flags...]
#   sbatch --nodes=4 launch/slurm_gpu.sh configs/imagenet_resnet50.py \
#       /shared/runs/in_r50 --config.dataset.data_dir=/shared/tensorflow_datasets
#
# WORKDIR must be on a filesystem every node sees (NFS, Lustre, ...): each
# process writes its part of every Orbax checkpoint there. Edit the #SBATCH
# lines for your cluster; the global batch (config.batch_size) must divide by
# the number of GPUs (nodes x 8 here).
#
# Coordinator: by default HOST:PORT of the first node of $SLURM_JOB_NODELIST,
# passed explicitly. JAX_AUTO=1 instead passes --distributed and lets JAX read
# the SLURM_* variables itself (same result where JAX's detection works).
# Either way each process uses only GPU number $SLURM_LOCALID of its node
# (JAX's Slurm detection sets this).
#
# Install once on a node with the cluster's CUDA driver:
#   pip install -e '.[cuda]'
# (plain `pip install -e .` gives CPU-only jaxlib; this script exports
# SIMCLR_JAX_REQUIRE_ACCELERATOR=1, so such a run stops with one line instead
# of training on the CPUs).
#
# Preemption: Slurm sends SIGTERM to every task 5 minutes before the end
# (--signal); the train loop finishes its step, checkpoints and exits, and
# the requeued job (same command, same WORKDIR) resumes where it stopped.
#
# Stopping by hand: `scancel --signal=TERM JOBID` does the same. A SIGTERM or
# SIGINT that reaches this script (--signal=B:TERM@..., kill) is passed on
# to every task the same way. A plain `scancel JOBID` signals srun too,
# which answers SIGTERM by killing its tasks at once: no checkpoint.
# Exit status: srun's, the highest among the tasks; a task that fails ends
# the others (--kill-on-bad-exit), so a failure is never waited out.
#SBATCH --job-name=simclr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
usage='usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [flags...]'
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
python=${PYTHON:-python}

if [[ "${JAX_AUTO:-0}" == 1 ]]; then
  dist_flags=(--distributed)
else
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # A port derived from the job id, so two jobs sharing a node do not clash.
  port=$((20000 + SLURM_JOB_ID % 20000))
  dist_flags=(--coordinator_address="$head_node:$port"
              --num_processes="$SLURM_NTASKS")
fi
echo "simclr: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes;" \
     "coordinator ${head_node:-auto}${port:+:$port}; workdir $workdir"

# --process_id must be evaluated in each task ($SLURM_PROCID differs), hence
# the inner shell; the other arguments are quoted here once, so flags with
# spaces survive the second parse.
args=$(printf ' %q' --config="$config" --workdir="$workdir" \
       "${dist_flags[@]}" "$@")
pid_flag='--process_id=$SLURM_PROCID'  # Literal: the task's shell expands it.
if [[ "${JAX_AUTO:-0}" == 1 ]]; then
  pid_flag=''
fi
export SIMCLR_JAX_REQUIRE_ACCELERATOR=1
# A signal to this script goes to the tasks through Slurm, not to srun: srun
# turns a SIGTERM it receives into SIGKILL for its tasks ("srun: forcing job
# termination"), while `scancel --signal=TERM` delivers SIGTERM to the tasks
# of the job's steps and leaves the batch script, and srun in it, alone.
# srun runs in the background because bash runs a trap only once its
# foreground command has ended.
trap 'scancel --signal=TERM "$SLURM_JOB_ID" || true' TERM INT
srun --kill-on-bad-exit=1 bash -c "exec $python -m simclr_jax.main$args $pid_flag" &
srun_pid=$!
# wait returns early when a trapped signal arrives: wait again until srun
# has ended (bash keeps its exit status), then exit with that status.
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?
exit "$status"
