#!/usr/bin/env bash
# A one-node SLURM on this machine, for trying hydra/launcher=slurm before a cluster, and for the tests.
#
#   bash/slurm-local.sh start     # prints the line to export: export SLURM_CONF=<folder>/slurm.conf
#   bash/slurm-local.sh status    # sinfo of the local SLURM (exit 1 when it is not running)
#   bash/slurm-local.sh stop      # stops the daemons and removes the folder
#
# Needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge). Writes everything into one
# temporary folder (MCHAD_SLURM_DIR, default <temp dir>/mchad-slurm): slurm.conf (SlurmctldHost = this host,
# one node with this machine's CPUs and memory as `slurmd -C` reports them, proctrack/linuxproc, task/none,
# accounting off), a munge key of its own, the daemons' sockets, state, logs and pid files. munged,
# slurmctld and slurmd run as root from there; nothing in /etc is read or changed. The SLURM commands
# (sinfo, sbatch, srun, scancel, hydra/launcher=slurm) find this SLURM through SLURM_CONF.
# Ports: MCHAD_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd). start is idempotent: a
# running local SLURM is left as it is.
set -euo pipefail

DIR="${MCHAD_SLURM_DIR:-$(dirname "$(mktemp -u)")/mchad-slurm}"
PORT="${MCHAD_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive <pid file>: its process runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_idle() {  # the node is up and free (sinfo answers, state idle)
    [[ "$(sinfo -h -N -o %t 2>/dev/null)" == "idle" ]]
}

write_conf() {
    local node
    # e.g. NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
    node=$(slurmd -C | head -n 1)
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this machine: $node"
    cat >"$CONF" <<EOF
# one-node SLURM written by bash/slurm-local.sh; removed by its stop
ClusterName=mchad-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a job step credential's lifetime, also how long SLURM holds a requeued job before it
# may start again (its old credential must have expired): 30 s here instead of the default 120 s
AuthInfo=socket=$DIR/munge.socket,cred_expire=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# no cgroups: every machine (a container too) can run it
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# accounting off: no slurmdbd (sacct does not work here)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
# CPUs are allocated, memory is checked against the node but not reserved
SelectTypeParameters=CR_CPU
ReturnToService=2
# a job's steps get KillWait seconds between SIGTERM and SIGKILL (clusters: often 30)
KillWait=10
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$DIR/munged.pid" && return
    [[ -s "$DIR/munge.key" ]] || mungekey --create --keyfile="$DIR/munge.key" >/dev/null
    chmod 600 "$DIR/munge.key"
    munged --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" --force \
        || die "munged did not start (see $DIR/munged.log)"
}

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || die "slurmctld or munged not found: apt-get install slurm-wlm munge"
    [[ "$(id -u)" == 0 ]] || die "the daemons run as root here: run it as root"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_idle; then
        say "already running"
        echo "export SLURM_CONF=$CONF"
        return
    fi
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR"
    write_conf
    start_munge
    alive "$DIR/slurmctld.pid" || slurmctld -i || die "slurmctld did not start (see $DIR/slurmctld.log)"
    alive "$DIR/slurmd.pid" || slurmd || die "slurmd did not start (see $DIR/slurmd.log)"
    local waited=0
    until node_idle; do
        ((waited++ < 300)) || die "the node is not idle after 30 s: $(sinfo -N 2>&1 | tail -n 1) (logs in $DIR)"
        sleep 0.1
    done
    say "one node up ($(sinfo -h -N -o '%N, %c CPUs, %m MB') in partition $(sinfo -h -o %P))"
    echo "export SLURM_CONF=$CONF"
}

running() {  # running <pid>...: one of them still runs
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

stop_daemons() {  # stop_daemons <pid file>...: SIGTERM to all at once, up to 10 s for them to end, then SIGKILL
    # together: each takes about 2 s to end, one after the other 5.2 s, together 1.3 s (measured)
    local file pids=()
    for file in "$@"; do alive "$file" && pids+=("$(cat "$file")"); done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        running "${pids[@]}" || return 0
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
    [[ -d "$DIR" ]] || { say "not running"; return; }
    # jobs still running end with their daemons; slurmstepd processes left by slurmd go too
    if alive "$DIR/slurmctld.pid" && [[ -n "$(squeue -h 2>/dev/null)" ]]; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 150); do
            [[ -z "$(squeue -h 2>/dev/null)" ]] && break
            sleep 0.1
        done
    fi
    stop_daemons "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"
    rm -rf "$DIR"
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) alive "$DIR/slurmctld.pid" && sinfo -N ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
