#!/usr/bin/env bash
# lmtrain on a multi-host Cloud TPU VM slice: the same command on every worker.
#
#   launch/tpu_vm.sh TPU_NAME ZONE EXPERIMENT.py[:ARG] WORKDIR [lmtrain train options...]
#
# Needs the repository at ~/lmtrain on every worker (installed with `pip install -e ~/lmtrain`)
# and a WORKDIR every worker can write (a gs:// bucket path or a shared filesystem): every
# process takes part in checkpoints. LMTRAIN_DISTRIBUTED=auto makes each process call
# jax.distributed.initialize() with no arguments, which finds the slice's peers itself.
set -euo pipefail
TPU=${1:?usage: launch/tpu_vm.sh TPU_NAME ZONE EXPERIMENT.py[:ARG] WORKDIR [options...]}
ZONE=${2:?zone}
EXPERIMENT=${3:?experiment}
WORKDIR=${4:?workdir}
shift 4
ARGS=$(printf ' %q' "$EXPERIMENT" --workdir "$WORKDIR" "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/lmtrain && LMTRAIN_DISTRIBUTED=auto python3 -m lmtrain train$ARGS"
