#!/usr/bin/env bash
# A one-machine SLURM cluster for the tests: a controller and one node (localhost, this
# machine's CPUs), no network beyond localhost, no munge (auth/none, cred/none).
#
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts slurmctld and slurmd,
#                                      # waits until the node is idle; then: SLURM_CONF=DIR/slurm.conf
#   tests/slurm/cluster.sh stop DIR    # stops both daemons
#
# Needs root and Debian's slurmctld, slurmd and slurm-client (apt-get install slurmctld slurmd
# slurm-client); .ci/run installs them.
set -euo pipefail
cmd=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")

stop() {
  for d in slurmd slurmctld; do
    if [[ -f "$dir/$d.pid" ]]; then
      kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
    fi
  done
  for _ in $(seq 50); do
    pgrep -f "slurm(ctld|d) -f $dir/slurm.conf" >/dev/null || return 0
    sleep 0.2
  done
  pkill -9 -f "slurm(ctld|d) -f $dir/slurm.conf" || true
}

if [[ $cmd == stop ]]; then
  stop
  exit 0
fi
[[ $cmd == start ]] || { echo "usage: cluster.sh start|stop DIR" >&2; exit 2; }

mkdir -p "$dir/state" "$dir/spool"
cpus=$(nproc)
mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
# Ports from the directory's name, so two clusters (two CI runs) on one machine do not meet.
base=$((20000 + $(cksum <<<"$dir" | cut -d' ' -f1) % 20000))
cat >"$dir/slurm.conf" <<CONF
ClusterName=lmtrain-test
SlurmctldHost=localhost
SlurmctldPort=$base
SlurmdPort=$((base + 1))
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds before it may start again (120 by default).
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
SchedulerParameters=sched_interval=1
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
stop
slurmctld -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 150); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "slurm: node idle ($cpus CPUs); SLURM_CONF=$dir/slurm.conf"
    exit 0
  fi
  sleep 0.2
done
echo "slurm: the node did not come up; logs in $dir" >&2
tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
stop
exit 1
