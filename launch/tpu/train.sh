#!/bin/bash
# VLA-Cabin on a multi-host Cloud TPU slice: the same command on every host of the slice.
#
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command \
#     "cd vlacabin_jax && bash launch/tpu/train.sh configs/vla_cabin.py:base /mnt/shared/runs/base"
#
# Install once per host: python -m pip install -e '.[tpu]'. On a multi-host slice
# (TPU_WORKER_HOSTNAMES lists several hosts) `python -m launch` calls
# jax.distributed.initialize(), which finds the coordinator and process ids from the TPU metadata.
# A maintenance event or preemption sends SIGTERM; every host saves at the same step and exits 0.
# Run the same command again to resume. WORKDIR must be one directory every host sees (an NFS or
# Filestore mount; the trainer writes it through the local filesystem API).
set -euo pipefail
CONFIG=${1:?usage: train.sh CONFIG WORKDIR [--config.overrides ...]}
WORKDIR=${2:?usage: train.sh CONFIG WORKDIR [--config.overrides ...]}
shift 2
# Overlap collectives with compute across the slice's ICI.
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-} --xla_tpu_enable_latency_hiding_scheduler=true"
exec python -m launch --config "$CONFIG" --workdir "$WORKDIR" "$@"
