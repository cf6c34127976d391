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
# Stopping: Ctrl-C here does not stop the remote processes; use
#   gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all \
#       --command='pkill -TERM -f simclr_jax.main'
# which makes each host checkpoint and exit. Re-running resumes.
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
# Refuse to train on the hosts' CPUs if JAX was installed without TPU support.
ssh_all "cd $repo_dir && SIMCLR_JAX_REQUIRE_ACCELERATOR=1 $python -m simclr_jax.main$args"
