#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for CI and for trying slurm/*.sbatch locally:
# nodes n1 (127.0.0.1) and n2 (127.0.0.2), 2 CPUs each (set CPUS=...), no accounting, no cgroups.
# Idempotent: reruns leave a running cluster alone (they rewrite slurm.conf and restart the daemons only if
# it changed). Needs root (daemons, /etc/slurm, apt-get).
#   sudo slurm/start_cluster.sh && sinfo
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "start_cluster.sh: must run as root (it installs slurm/munge and starts their daemons); SLURM tests will skip" >&2
  exit 1
fi
CPUS=${CPUS:-$(nproc)}
MEM_MB=${MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))}  # per node: a quarter of RAM

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "start_cluster.sh: installing slurmctld slurmd slurm-client munge" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2 /var/log/slurm /run/munge
chown -R slurm:slurm /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
CONF=/etc/slurm/slurm.conf
NEW=$(cat <<CONF
# Written by ldm slurm/start_cluster.sh: two emulated nodes on one host.
ClusterName=ldm
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
# Requeue: jobs may requeue themselves (ldm runs 'scontrol requeue' after a signal-stop checkpoint).
JobRequeue=1
# Finished jobs stay visible to 'scontrol show job' this long (there is no accounting / sacct).
MinJobAge=300
# Seconds between SIGTERM and SIGKILL when a job is cancelled or hits its time limit.
KillWait=30
# A requeued job waits cred_expire + 1 s in PENDING (BeginTime) before it may start again (slurm 22.05:
# AuthInfo=cred_expire, default 120 s; slurm >= 26.05 also SchedulerParameters=requeue_delay=). The launch
# credential of a step must stay valid this long: 10 s is plenty for these local nodes, not a cluster default.
AuthInfo=cred_expire=10
# bf_interval: how often the backfill scheduler looks at the queue (default 30 s); a requeued job starts at
# the first look after its hold. sched_interval: the same for the main scheduler (default 60 s).
SchedulerParameters=nohold_on_prolog_fail,bf_interval=5,sched_interval=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=6818 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.2 NodeHostname=$(hostname) Port=6819 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# Preemption: jobs in partition spot are requeued (PreemptMode=REQUEUE) when a job of a higher tier needs
# their nodes. GraceTime=0: SIGTERM now, SIGKILL after KillWait; spot_grace: SIGTERM now, KillWait after 60 s.
# debug jobs are never preempted.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF
PartitionName=spot Nodes=n1,n2 MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE
PartitionName=spot_grace Nodes=n1,n2 MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
CONF
)
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW" ]; then
  printf '%s\n' "$NEW" > "$CONF"
  changed=1
fi

if ! pgrep -x munged >/dev/null; then
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
fi
stop_daemon() {  # by its pid file; running jobs survive (their slurmstepd processes are separate)
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
}
if [ "$changed" = 1 ]; then  # a restart, not `scontrol reconfigure`: that keeps the old AuthInfo (cred_expire)
  stop_daemon /run/slurmctld.pid
  for n in n1 n2; do stop_daemon "/run/slurmd-$n.pid"; done
fi
if ! pgrep -x slurmctld >/dev/null; then slurmctld; fi
for n in n1 n2; do
  if ! pgrep -f "slurmd -N $n\b" >/dev/null; then slurmd -N "$n"; fi
done

for _ in $(seq 60); do
  idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)/' | wc -l)
  if [ "$idle" -ge 2 ]; then
    sinfo -N
    exit 0
  fi
  # a node that came back after a restart may be marked down: return it to service
  scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
  sleep 1
done
echo "start_cluster.sh: nodes n1, n2 not idle after 60 s:" >&2
sinfo -N >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log >&2 || true
exit 1
