#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for tests, CI and trying dreamfleet's Slurm
# backend without a cluster. Needs root and Debian's slurm-wlm + munge.
#
#   slurm/cluster.sh up DIR      start munged (if needed), slurmctld and two slurmd (n1, n2)
#   slurm/cluster.sh down DIR    stop them
#   slurm/cluster.sh status DIR  nodes and queue (exit 1 when the controller does not answer)
#   slurm/cluster.sh env DIR     print the export line clients need (SLURM_CONF)
#
# Both nodes are this host (NodeAddr=127.0.0.1, slurmd ports 17001-17002); jobs may share them.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 up|down|status|env DIR" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/slurm.conf"
cpus=${SLURM_NODE_CPUS:-$(nproc)}
mem_mb=${SLURM_NODE_MEM_MB:-4000}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$key" && chmod 400 "$key"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  su -s /bin/sh munge -c "munged" || runuser -u munge -- munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged did not start" >&2; exit 1
}

write_conf() {
  local host
  host=$(hostname)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<EOF
ClusterName=dreamfleet-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-16817}
AuthType=auth/munge
# credentials live 10 s (default 120): a requeued job may start again that soon after it stopped
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobRequeue=1
AccountingStorageType=accounting_storage/none
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
MessageTimeout=30
KillWait=20
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

# A job's slurmstepd outlives the daemons that started it, and the ports above are fixed: a step
# left by a cluster that is gone reports its end to the next cluster's controller, which takes
# it for that cluster's job of the same id and ends it. So `down` ends the jobs first, and both
# `down` and `up` end steps whose cluster has no controller running.
with_tree() { local p; for p in "$@"; do echo "$p"; with_tree $(pgrep -P "$p" || true); done; }
stale_steps() {  # slurmstepd processes of this cluster ($1 = this), or of any cluster whose controller is gone
  local p c
  for p in $(pgrep -x slurmstepd || true); do
    c=$({ tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | sed -n 's/^SLURM_CONF=//p')
    [ -n "$c" ] || continue
    if [ "$c" = "${1:-}" ] || ! pgrep -f "slurmctld -f $c\$" >/dev/null; then echo "$p"; fi
  done
}
end_stale_steps() {
  local pids
  pids=$(with_tree $(stale_steps "${1:-}"))
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}

case "$cmd" in
  up)
    command -v slurmctld >/dev/null || { echo "slurm-wlm is not installed (apt-get install slurm-wlm munge)" >&2; exit 1; }
    start_munge
    end_stale_steps
    write_conf
    export SLURM_CONF="$conf"
    slurmctld -f "$conf"
    slurmd -f "$conf" -N n1
    slurmd -f "$conf" -N n2
    for _ in $(seq 150); do
      idle=$(sinfo -h -N -o "%N %t" 2>/dev/null | grep -c -E "idle|mix|alloc" || true)
      [ "$idle" -ge 2 ] && { echo "slurm cluster up: export SLURM_CONF=$conf"; exit 0; }
      sleep 0.2
    done
    echo "slurm nodes did not come up; logs in $dir/log" >&2
    sinfo -N >&2 || true
    exit 1
    ;;
  down)
    export SLURM_CONF="$conf"
    if pgrep -f "slurmctld -f $conf\$" >/dev/null; then  # end the jobs the proper way first (up to 30 s)
      jobs=$(squeue -h -o %A 2>/dev/null || true)
      [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
      for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break; sleep 0.2; done
    fi
    for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid; do
      [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for _ in $(seq 50); do
      pgrep -f "slurm(ctld|d) -f $conf" >/dev/null || break
      sleep 0.1
    done
    pkill -9 -f "slurm(ctld|d) -f $conf" || true
    end_stale_steps "$conf"
    ;;
  status)
    export SLURM_CONF="$conf"
    [ -f "$conf" ] || { echo "no cluster in $dir (run: $0 up $dir)" >&2; exit 1; }
    sinfo -N -o "%N %t %C" || exit 1
    squeue -o "%i %j %T %M %R"
    ;;
  env)
    echo "export SLURM_CONF=$conf"
    ;;
  *)
    echo "usage: $0 up|down|status|env DIR" >&2; exit 2 ;;
esac
