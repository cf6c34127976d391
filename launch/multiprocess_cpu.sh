#!/usr/bin/env bash
# One job as N processes x M virtual CPU devices on this machine.
#
# Exercises the multi-host code path without a cluster: jax.distributed with
# a coordinator on localhost, gloo collectives between the processes, each
# process reading its own shard of every global batch, and Orbax writing one
# checkpoint from all processes. A 2 x 4 run trains what a 1 x 8 run trains
# (tests/test_multiprocess.py checks it).
#
#   launch/multiprocess_cpu.sh CONFIG WORKDIR [flags...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/multiprocess_cpu.sh \
#       configs/digits.py /tmp/simclr_mp --config.batch_size=64
#
# Environment: NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), PORT (a free one),
# PYTHON (python). Process 0's log goes to the terminal and to
# WORKDIR/logs/process_0.log, the others' to WORKDIR/logs/process_<i>.log.
# Exit status: the first non-zero one among the processes, else 0. A process
# that dies makes the others exit 1 within --peer_timeout (default 60 s), or
# 134 at once when it was process 0 (JAX's abort), so the script never waits
# on a hung job.
# Re-running the same command resumes from the last checkpoint.
set -euo pipefail
usage='usage: launch/multiprocess_cpu.sh CONFIG WORKDIR [flags...]'
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
num_processes=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-4}
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
mkdir -p "$workdir/logs"

pids=()
# Ctrl-C or a scheduler's SIGTERM reaches every process, which checkpoints.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  cmd=(env XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
       JAX_PLATFORMS=cpu
       "$python" -m simclr_jax.main --config="$config" --workdir="$workdir"
       --coordinator_address="localhost:$port"
       --num_processes="$num_processes" --process_id="$i" "$@")
  log="$workdir/logs/process_$i.log"
  if ((i == 0)); then
    # tee in a process substitution, so that $! is the training process
    # itself (which the trap must signal), not a subshell running a pipeline.
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  # wait returns early (128 + the signal) when a trapped signal arrives:
  # wait again until the process has ended (bash keeps its exit status).
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
  done
  rc=0
  wait "$pid" || rc=$?
  if ((status == 0 && rc != 0)); then
    status=$rc
  fi
done
exit "$status"
