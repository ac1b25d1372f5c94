#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for the launcher's tests.
#
#   bash tests/slurm/cluster.sh start    # install if missing, start, wait until idle
#   bash tests/slurm/cluster.sh stop     # cancel its jobs, stop the daemons it started
#   bash tests/slurm/cluster.sh status   # exit 0 when it is up, 1 when not
#
# What it owns: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (refused
# when a file there was not written by this script), and everything under
# $SNGAN_SLURM_STATE (default /var/tmp/sngan-slurm): a private MariaDB, the
# controller's state, the slurmd spools, logs and the pid files of the
# daemons it started. `stop` kills exactly those pids, never a daemon by name;
# a munged that was already running is used and left alone.
#
# Every fresh start wipes the state, so job ids restart at 1: callers use a new
# submitit folder per test. Needs root (it is run as root on CI).
set -euo pipefail

STATE=${SNGAN_SLURM_STATE:-/var/tmp/sngan-slurm}
CONF_DIR=/etc/slurm
MARKER="# written by sngan tests/slurm/cluster.sh"
HOST=$(hostname -s)
NODES=(n1 n2)
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=16820
FIRST_SLURMD_PORT=16901
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
OWNED="$STATE/owned"        # one file per daemon we started, holding its pid

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    # policy-rc.d answers 101 so that the packages' own init scripts start nothing:
    # this script starts (and later stops) each daemon itself.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || log "apt-get update failed; trying the install anyway"
    local rc=0
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1 || rc=$?
    [ -n "$added_policy" ] && rm -f "$policy"
    [ $rc -eq 0 ] || { tail -20 "$STATE/apt.log" >&2; die "apt-get install ${missing[*]} failed (rc=$rc)"; }
}

# A zombie counts as gone: the init of a container may take seconds to reap it.
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

owned_pid() { cat "$OWNED/$1" 2>/dev/null || true; }

# The recorded pid, if that process is still the daemon we started (slurmd-n1 -> slurmd):
# after a reboot or a killed session the number may belong to something else.
live_owned_pid() {
    local pid
    pid=$(owned_pid "$1")
    pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%%-*}" ] && echo "$pid"
}

# Waits until a daemon has written its pid file, then records the pid as ours.
adopt_pid_file() {
    local name=$1 pidfile=$2 i
    for i in $(seq 1 100); do
        if [ -s "$pidfile" ] && pid_alive "$(cat "$pidfile")"; then
            cat "$pidfile" > "$OWNED/$name"; return 0
        fi
        sleep 0.1
    done
    die "$name did not start (no live pid in $pidfile); see $STATE/log/"
}

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2 start=$SECONDS; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - start)) -ge "$limit" ] && die "timed out after ${limit}s waiting for $what; see $STATE/log/"
        sleep 0.2
    done
}

check_conf_is_ours() {
    local f
    for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf"; do
        if [ -e "$f" ] && ! head -1 "$f" | grep -qF "$MARKER"; then
            die "$f exists and was not written by this script; refusing to replace a real cluster's configuration"
        fi
    done
}

write_configs() {
    local ncpu node_lines="" port=$FIRST_SLURMD_PORT n
    ncpu=$(nproc)
    for n in "${NODES[@]}"; do
        node_lines+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$ncpu RealMemory=4096 State=UNKNOWN"$'\n'
        port=$((port + 1))
    done
    mkdir -p "$CONF_DIR"
    cat > "$CONF_DIR/slurm.conf" <<EOF
$MARKER (state in $STATE)
ClusterName=sngan
# Must be the real short host name, or slurmctld refuses to start here.
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Step credentials of a requeued job must expire before it may start again:
# 10 s instead of the default 120 s makes a requeue take ~12 s, not ~140 s.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# Accounting through slurmdbd: submitit asks sacct for the state of its jobs.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule at once, and look at pending jobs every second: a requeued job becomes
# eligible cred_expire+1 s after its requeue and is then only seen by a periodic pass.
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes below share this host's cores; take their sizes from this file.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
$node_lines
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$CONF_DIR/slurmdbd.conf" <<EOF
$MARKER (state in $STATE)
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"   # slurmdbd refuses a readable one
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        log "munged already running (not started here; stop will leave it)"
        return 0
    fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    adopt_pid_file munged /run/munge/munged.pid
    wait_until 10 "munged" munge_works
}

db() { mariadb --no-defaults --protocol=socket --socket="$STATE/run/mysqld.sock" -uroot "$@"; }

start_mariadb() {
    local data="$STATE/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$data" --auth-root-authentication-method=normal \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || { tail "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    # mariadbd does not daemonize: detach it, and keep the caller's pipes free.
    setsid mariadbd --no-defaults --user=root --datadir="$data" --socket="$STATE/run/mysqld.sock" \
        --port=$DB_PORT --bind-address=127.0.0.1 --pid-file="$STATE/run/mysqld.pid" \
        --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=64M --skip-log-bin \
        </dev/null >/dev/null 2>&1 &
    adopt_pid_file mariadbd "$STATE/run/mysqld.pid"
    wait_until 30 "mariadb" db -e "SELECT 1"
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';"
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [ "$(echo "$states" | grep -c ' idle$')" -eq ${#NODES[@]} ]
}

cluster_up() {
    local f
    [ -d "$OWNED" ] || return 1
    for f in slurmctld slurmdbd mariadbd "${NODES[@]/#/slurmd-}"; do
        [ -n "$(live_owned_pid "$f")" ] || return 1
    done
    sinfo -h >/dev/null 2>&1
}

start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts system daemons)"
    mkdir -p "$STATE"
    if cluster_up; then
        wait_until 60 "nodes idle" nodes_idle
        log "already running"; sinfo; return 0
    fi
    [ -d "$OWNED" ] && { log "found a partly running cluster; stopping it first"; stop; }
    install_packages
    check_conf_is_ours
    rm -rf "$STATE/spool" "$STATE/run" "$STATE/log" "$STATE/mysql" "$OWNED"
    mkdir -p "$STATE/spool/ctld" "$STATE/run" "$STATE/log" "$OWNED"
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/slurmd-$n"; done
    write_configs
    local t0=$SECONDS
    start_munge
    start_mariadb
    slurmdbd
    adopt_pid_file slurmdbd "$STATE/run/slurmdbd.pid"
    wait_until 30 "slurmdbd port $DBD_PORT" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
    slurmctld
    adopt_pid_file slurmctld "$STATE/run/slurmctld.pid"
    for n in "${NODES[@]}"; do
        slurmd -N "$n"
        adopt_pid_file "slurmd-$n" "$STATE/run/slurmd-$n.pid"
    done
    wait_until 60 "nodes idle" nodes_idle
    # Accounting must know the cluster before submitit's sacct can see jobs.
    wait_until 30 "cluster in accounting" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx sngan"
    log "started in $((SECONDS - t0))s (state in $STATE)"
    sinfo
}

stop_pid() {  # stop_pid NAME: TERM, wait up to 15 s, then KILL
    local name=$1 pid i
    pid=$(live_owned_pid "$name" || true)
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 150); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then log "$name ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$OWNED/$name"
}

stop() {
    [ -d "$OWNED" ] || { log "not running (nothing started by this script)"; return 0; }
    # Jobs first, while the daemons that end them are still up.
    if [ -n "$(live_owned_pid slurmctld)" ] && squeue -h -o %i 2>/dev/null | grep -q .; then
        scancel --partition=debug 2>/dev/null || true
        local i
        for i in $(seq 1 100); do squeue -h -o %i 2>/dev/null | grep -q . || break; sleep 0.2; done
    fi
    local n
    for n in "${NODES[@]}"; do stop_pid "slurmd-$n"; done
    stop_pid slurmctld
    stop_pid slurmdbd
    stop_pid mariadbd
    stop_pid munged
    rmdir "$OWNED" 2>/dev/null || true
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if cluster_up; then sinfo; else log "not running"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
