#!/usr/bin/env bash
# Run a recipe on this machine (all local devices; CPU, one GPU, or a TPU VM).
#   launch/local.sh configs/digits.py /tmp/simclr_digits [--config.batch_size=...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
exec python -m simclr_jax.main --config="$config" --workdir="$workdir" "$@"
