#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd
# (Debian's slurm-wlm and munge), one node named after `hostname -s`, partition `debug`.
#
#   bash scripts/slurm_local.sh          # start it unless `sinfo` already shows a node up
#   bash scripts/slurm_local.sh --stop   # stop the daemons this script started
#
# Needs root (apt-get, /etc/slurm, /var/spool). Containers have no systemd and no usable
# cgroups, so the daemons are started directly and track processes by parent PID.
# docs/slurm_local.md records what works on this cluster and what does not.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by tuneforge scripts/slurm_local.sh"
STATE=/run/slurm_local          # pid files of the daemons this script started
LOG=/var/log/slurm
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

log() { echo "slurm_local: $*" >&2; }

node_up() {
    # `sinfo -h -o %T` prints one state per node: idle, mixed, allocated, completing;
    # down, drained or a trailing `*` (not responding) do not count as up.
    sinfo -h -o %T 2>/dev/null | grep -qxE 'idle|mixed|allocated|completing'
}

# Not `kill -0`: it fails for a user who may not signal the (root) daemon.
alive() { [ -s "$1" ] && [ -d "/proc/$(cat "$1")" ]; }

stop() {
    local name pidfile pid
    for name in slurmd slurmctld munged; do
        pidfile=$STATE/$name.pid
        alive "$pidfile" || { rm -f "$pidfile"; continue; }
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -9 "$pid"
        fi
        rm -f "$pidfile"
        log "stopped $name ($pid)"
    done
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists when they are missing (fresh images ship without them).
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then apt-get update -q >/dev/null; fi
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    local node=$1 cpus mem_mb
    cpus=$(nproc)
    # A node whose RealMemory exceeds what slurmd measures is set DOWN ("Low RealMemory"), so
    # declare 90% of MemTotal.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script; move it away or start that cluster"
        exit 1
    fi
    mkdir -p /etc/slurm
    cat >"$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
${COMM_PARAMS:+CommunicationParameters=$COMM_PARAMS}
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# No systemd and no cgroups in a container: track job processes by parent PID, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
# Single CPUs are the unit, so two 1-CPU tasks run side by side on a 2-CPU node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start a requeued or newly eligible job within seconds rather than at the next 30 s pass.
SchedulerParameters=bf_interval=2
# Without accounting, finished jobs are only visible to squeue/scontrol for MinJobAge seconds.
MinJobAge=600
# Between the SIGTERM of scancel/time limit and the SIGKILL: time for a checkpoint.
KillWait=30
JobRequeue=1
# A requeued job may start again once its credential expires (default 120 s); tests requeue
# jobs and wait for the second run, so expire them sooner.
AuthInfo=cred_expire=10
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
# Preemption as a shared cluster sets it up: a job in partition urgent requeues the debug jobs whose CPUs
# it needs, GraceTime seconds after sending them their own --signal (preempt_send_user_signal; Slurm 23.02
# and later also take PreemptParameters=send_user_signal). Without a job in urgent, nothing changes.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes=$node MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start_munged() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    # The daemons must not inherit our stdout/stderr: a caller reading them to EOF
    # (pytest's subprocess.run, CI) would wait for the daemons to exit.
    runuser -u munge -- munged </dev/null >>/var/log/munge/munged.out 2>&1
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

start_slurm() {
    install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld "$LOG"
    install -d -m 0755 /var/spool/slurmd
    # -c: start from an empty job and node state; this cluster holds nothing worth keeping,
    # and old state could leave the node drained.
    if ! alive /run/slurmctld.pid; then
        slurmctld -c </dev/null >>"$LOG/slurmctld.out" 2>&1
        for _ in $(seq 50); do alive /run/slurmctld.pid && break; sleep 0.1; done
        cp /run/slurmctld.pid "$STATE/slurmctld.pid"
    fi
    if ! alive /run/slurmd.pid; then
        slurmd -c -N "$1" </dev/null >>"$LOG/slurmd.out" 2>&1
        for _ in $(seq 50); do alive /run/slurmd.pid && break; sleep 0.1; done
        cp /run/slurmd.pid "$STATE/slurmd.pid"
    fi
}

as_root() {
    [ "$(id -u)" -eq 0 ] && return
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then exec sudo -n bash "$0" "$@"; fi
    log "needs root (or password-less sudo) to install, start and stop SLURM"
    exit 1
}

case "${1:-}" in
    --stop) as_root --stop; stop; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--stop]" >&2; exit 2 ;;
esac

# With our config and no slurmctld running, skip the check: sinfo retries for ~9 s first.
if command -v sinfo >/dev/null && ! { grep -qsF "$MARK" "$CONF" && ! alive /run/slurmctld.pid; } && node_up; then
    exit 0
fi
as_root

NODE=$(hostname -s)
# Every daemon and client resolves the node name; add it to /etc/hosts when nothing resolves it.
if ! getent hosts "$NODE" >/dev/null; then
    log "adding '127.0.1.1 $NODE' to /etc/hosts"
    echo "127.0.1.1 $NODE" >>/etc/hosts
fi
# Everything talks over 127.0.0.1. NoCtldInAddrAny/NoInAddrAny make the daemons and srun bind
# to the address the host name resolves to instead of every interface; that only works when
# it is 127.0.0.1 itself: with Debian's usual `127.0.1.1 <host>`, slurmd connects back to an
# srun listening on 127.0.1.1 from 127.0.0.1 and is refused ("connect io: Connection refused").
COMM_PARAMS=
if [ "$(getent ahostsv4 "$NODE" | awk 'NR == 1 {print $1}')" = 127.0.0.1 ]; then
    COMM_PARAMS=NoCtldInAddrAny,NoInAddrAny
fi

install_packages
mkdir -p "$STATE"
write_conf "$NODE"
start_munged
start_slurm "$NODE"

for _ in $(seq $((WAIT_S * 2))); do
    node_up && { log "node $NODE is up: $(sinfo --version)"; exit 0; }
    sleep 0.5
done
log "node $NODE not up after ${WAIT_S}s; sinfo says: $(sinfo -h -o '%T %E' 2>&1 || true)"
for f in "$LOG/slurmctld.log" "$LOG/slurmd.log" /var/log/munge/munged.log; do
    echo "---- tail $f" >&2
    tail -n 30 "$f" >&2 2>/dev/null || echo "(missing)" >&2
done
exit 1
