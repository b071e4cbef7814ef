#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for resvae's Slurm tests and for trying
# `resvae sweep --launcher slurm` locally: Debian's slurm-wlm and munge, a minimal slurm.conf
# (no accounting, no cgroups), the daemons started, then wait until the node is idle.
# Needs root (it writes /etc/slurm/slurm.conf and /etc/munge/munge.key). Stop with slurm-down.sh.
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
state=/tmp/resvae-slurm
mkdir -p "$state"/{state,spool,log} /etc/slurm /etc/munge /run/munge /var/lib/munge /var/log/munge

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=resvae
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "slurm-up: the node did not become idle in 60 s; logs in $state/log" >&2
scontrol update NodeName="$host" State=RESUME 2>/dev/null || true
sinfo >&2 || true
exit 1
