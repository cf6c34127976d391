#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM pod slice (e.g. v4-64: 8 hosts x 4 chips):
# the same command on every host through `gcloud ... ssh --worker=all`.
# JAX reads the slice's topology from the TPU metadata, so the program only
# needs --distributed; no addresses or process ids.
#
#   TPU=my-v4-64 ZONE=us-central2-b BUCKET=gs://my-bucket \
#       launch/tpu_pod.sh configs/imagenet_resnet50.py simclr/in_r50 [flags...]
#
# Data: TFDS datasets prepared under $BUCKET/tensorflow_datasets (passed as
# --config.dataset.data_dir; override with DATA_DIR). Workdir: $BUCKET/RUN,
# shared by all hosts (Orbax writes one checkpoint from all of them) and
# where results.json, metrics and TensorBoard summaries land. WORKDIR
# overrides it with any directory every host sees (a Filestore or gcsfuse
# mount).
# REPO_DIR: where this repository is checked out and installed on every host
# (~/simclr_jax); SETUP=1 first runs `pip install -e '.[tpu]'` there on all
# hosts (plain `pip install -e .` would install CPU-only jaxlib, and the run
# would be refused: SIMCLR_JAX_REQUIRE_ACCELERATOR=1 below).
# PYTHON: the interpreter on the hosts (python3).
#
# Stopping: a SIGTERM or SIGINT (Ctrl-C) to this script sends SIGTERM to the
# training process on every host, through one more `ssh --worker=all`; each
# host checkpoints and exits, and this script then exits with gcloud's
# status. Signalling gcloud is not enough: it ends gcloud or its ssh
# clients, never the remote commands, since a command that ssh runs without
# a terminal gets no SIGHUP when its ssh connection closes and trains on with its
# output going nowhere. From another machine, or once this script is gone:
#   gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all \
#       --command='pkill -TERM -f simclr_jax.main'
# Re-running resumes.
# Exit status: gcloud's, which waits for every host and returns the first
# non-zero status among them; a failed process ends the job on the other
# hosts (docs/robustness.md).
set -euo pipefail
usage='usage: TPU=... ZONE=... BUCKET=gs://... launch/tpu_pod.sh CONFIG RUN [flags...]'
tpu=${TPU:?$usage}
zone=${ZONE:?$usage}
bucket=${BUCKET:?$usage}
config=${1:?$usage}
run=${2:?$usage}
shift 2
repo_dir=${REPO_DIR:-'~/simclr_jax'}
data_dir=${DATA_DIR:-$bucket/tensorflow_datasets}
workdir=${WORKDIR:-$bucket/$run}
python=${PYTHON:-python3}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
      --command="$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "cd $repo_dir && $python -m pip install -q -e '.[tpu]'"
fi

args=$(printf ' %q' --config="$config" --workdir="$workdir" \
       --config.dataset.data_dir="$data_dir" --distributed "$@")
# Each host records the pid of its training process in a file named for this
# launch, in its own /tmp (\$ marks what each host expands), so that the
# stop command signals exactly that process. The stop command leaves a stop
# file before it reads the pid, and a host looks for that file after writing
# its pid, so a stop that comes while the ssh connections are still opening reaches
# every host too.
tag="simclr_jax.$(date +%s).$$"
pid_file="\${TMPDIR:-/tmp}/$tag.pid"
stop_file="\${TMPDIR:-/tmp}/$tag.stop"
stop_all() {
  local kill_cmd="kill -TERM \"\$(cat $pid_file)\" 2>/dev/null"
  ssh_all "touch $stop_file; if [ -e $pid_file ]; then $kill_cmd; fi; true" ||
    true
}
# exec keeps the recorded pid. SIMCLR_JAX_REQUIRE_ACCELERATOR: refuse to
# train on the hosts' CPUs if JAX was installed without TPU support.
run_cmd="cd $repo_dir && echo \$\$ > $pid_file"
run_cmd+=" && if [ -e $stop_file ]; then exit 143; fi"
run_cmd+=" && exec env SIMCLR_JAX_REQUIRE_ACCELERATOR=1"
run_cmd+=" $python -m simclr_jax.main$args"
# bash runs a trap only once its foreground command has ended, so gcloud
# runs in the background, with this script's stdin (a background command
# would get /dev/null).
trap stop_all TERM INT
ssh_all "$run_cmd" <&0 &
gcloud_pid=$!
# wait returns early when a trapped signal arrives: wait again until gcloud
# has ended (bash keeps its exit status), then exit with that status.
while kill -0 "$gcloud_pid" 2>/dev/null; do
  wait "$gcloud_pid" || true
done
status=0
wait "$gcloud_pid" || status=$?
exit "$status"
