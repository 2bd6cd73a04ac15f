#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for CI and for trying slurm/*.sbatch locally:
# nodes n1 (127.0.0.1) and n2 (127.0.0.2), 2 CPUs each (set CPUS=...), no accounting, no cgroups.
# Idempotent: reruns leave a running cluster alone (they rewrite slurm.conf and `scontrol reconfigure` only
# if it changed). Needs root (daemons, /etc/slurm, apt-get).
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
SchedulerParameters=nohold_on_prolog_fail
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=6818 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.2 NodeHostname=$(hostname) Port=6819 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
if ! pgrep -x slurmctld >/dev/null; then
  slurmctld
elif [ "$changed" = 1 ]; then
  scontrol reconfigure
fi
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
