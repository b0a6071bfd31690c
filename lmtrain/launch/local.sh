#!/usr/bin/env bash
# N lmtrain processes on this host over 127.0.0.1: for CPU testing (fake devices per process)
# or one process per GPU.
#
#   launch/local.sh N [--cpu-devices D | --gpus] -- train EXPERIMENT.py [lmtrain options...]
#
#   launch/local.sh 2 --cpu-devices 2 -- train experiments/quickstart.py:smoke --workdir runs/mp
#   launch/local.sh 8 --gpus -- train experiments/quickstart.py --workdir runs/8gpu
#
# Every process gets --coordinator/--num-processes/--process-id through LMTRAIN_* variables.
# If one process fails, the others are stopped and the script exits with that failure's status.
# SIGTERM/SIGINT to this script are forwarded to every process (they agree on a step, save a
# checkpoint and exit 0). Environment: PORT (default: a free port), PYTHON (default python3).
# Needs bash >= 5.1 (wait -n -p).
set -euo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
N=$1; shift
MODE=none; DEVICES=1
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --cpu-devices) MODE=cpu; DEVICES=$2; shift 2 ;;
    --gpus) MODE=gpu; shift ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] || usage
shift
PYTHON=${PYTHON:-python3}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
forward() { for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  (
    export LMTRAIN_COORDINATOR="127.0.0.1:$PORT" LMTRAIN_NUM_PROCESSES="$N" LMTRAIN_PROCESS_ID="$i"
    case $MODE in
      # The caller's other XLA flags stay; the device count is ours.
      cpu) export JAX_PLATFORMS=cpu XLA_FLAGS="$(echo "${XLA_FLAGS:-}" |
        sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g') --xla_force_host_platform_device_count=$DEVICES" ;;
      gpu) export CUDA_VISIBLE_DEVICES="$i" ;;
    esac
    exec "$PYTHON" -m lmtrain "$@"
  ) &
  pids+=($!)
done

status=0
live=("${pids[@]}")
while [ ${#live[@]} -gt 0 ]; do
  # wait -n returns when any process ends (or a forwarded signal interrupts it); a failure
  # stops the rest at once instead of leaving them blocked in a collective.
  ended=""
  set +e; wait -n -p ended "${live[@]}"; rc=$?; set -e
  [ -n "${ended:-}" ] || continue  # interrupted by a forwarded signal
  live=($(for p in "${live[@]}"; do [ "$p" = "$ended" ] || echo "$p"; done))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "launch/local.sh: process $ended exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
exit "$status"
