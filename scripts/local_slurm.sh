#!/usr/bin/env bash
# Throwaway single-node SLURM cluster on the local machine, for tests and
# for trying the workflow's SLURM profiles without a real cluster.
#
#   scripts/local_slurm.sh start    # install (if needed), configure, start, wait for idle node
#   scripts/local_slurm.sh stop     # stop exactly the daemons started by `start`, clean up
#   scripts/local_slurm.sh status   # show daemons and `sinfo`; exit 0 only if the cluster is up
#   scripts/local_slurm.sh env      # print `export SLURM_CONF=...` (use with eval)
#
# After `start`, point the SLURM client commands at the cluster with
#   export SLURM_CONF=${LOCAL_SLURM_DIR:-/tmp/mergescale-slurm}/slurm.conf
#
# Uses Debian's packages `slurm-wlm` and `munge` (installed with apt-get when
# missing). `start` and `stop` need root: the daemons run as root, munged as the
# `munge` user. Everything the cluster writes (config, state, spool, logs, pid
# files) lives in the state directory; the only things touched outside it are
# munge's standard directories (/etc/munge, /run/munge, /var/lib/munge,
# /var/log/munge) and a symlink /run/slurm/conf/slurm.conf -> the config (see
# RUN_CONF below; removed by `stop`).
#
# Daemons only listen on / talk to 127.0.0.1. The node has no GRES (no GPUs):
# jobs that request GPUs are rejected by this cluster, which is why the
# `slurm-local` Snakemake profile requests none.
#
# Environment:
#   LOCAL_SLURM_DIR            state directory            (default /tmp/mergescale-slurm)
#   LOCAL_SLURM_CLUSTER        ClusterName                (default mergescale)
#   LOCAL_SLURM_PARTITION      name of the default partition (default local)
#   LOCAL_SLURM_CTLD_PORT      slurmctld port             (default 6817)
#   LOCAL_SLURM_SLURMD_PORT    slurmd port                (default 6818)
#   LOCAL_SLURM_TIMEOUT        seconds to wait for an idle node (default 60)
#   LOCAL_SLURM_NO_INSTALL=1   never run apt-get; fail if packages are missing
set -euo pipefail

STATE_DIR=${LOCAL_SLURM_DIR:-/tmp/mergescale-slurm}
CLUSTER_NAME=${LOCAL_SLURM_CLUSTER:-mergescale}
PARTITION=${LOCAL_SLURM_PARTITION:-local}
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-6818}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}

CONF=$STATE_DIR/slurm.conf
MARKER=$STATE_DIR/.local_slurm   # marks a directory this script may clean up
PID_DIR=$STATE_DIR/pids
LOG_DIR=$STATE_DIR/log
SAVE_DIR=$STATE_DIR/state
SPOOL_DIR=$STATE_DIR/spool
# Where SLURM clients look for a config when neither SLURM_CONF nor
# /etc/slurm/slurm.conf is there (the spot a "configless" slurmd fills). Needed
# because Snakemake's jobstep executor drops all SLURM_* variables, SLURM_CONF
# included, before it calls `srun` inside a job.
RUN_CONF=/run/slurm/conf/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_KEY=/etc/munge/munge.key
# copy of the pid of a munged started by this script, kept outside the state
# dir so that `stop` still finds it if the state dir was wiped
MUNGE_PIDCOPY=/run/munge/local_slurm-munged.pid

export SLURM_CONF=$CONF

log() { printf '[local_slurm] %s\n' "$*"; }
die() { printf '[local_slurm] ERROR: %s\n' "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (it starts/stops system daemons); try: sudo $0 $1"
}

# ---------------------------------------------------------------- packages --
REQUIRED_CMDS=(slurmctld slurmd slurmstepd sbatch srun squeue sinfo scontrol scancel munged munge unmunge)
PACKAGES=(slurm-wlm munge)

missing_cmds() {
    local c missing=()
    for c in "${REQUIRED_CMDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] || missing+=("$c")
    done
    echo "${missing[*]:-}"
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Use-Pty=0 "${PACKAGES[@]}"
}

ensure_packages() {
    export PATH=$PATH:/usr/sbin:/sbin
    local missing
    missing=$(missing_cmds)
    if [[ -z $missing ]]; then
        log "packages present: $(dpkg-query -W -f='${Package} ${Version}, ' "${PACKAGES[@]}" 2>/dev/null | sed 's/, $//')"
        return
    fi
    [[ ${LOCAL_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing commands ($missing) and LOCAL_SLURM_NO_INSTALL=1; install: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "missing commands ($missing) and no apt-get; install SLURM and MUNGE by hand"
    log "missing commands: $missing -> apt-get install ${PACKAGES[*]}"
    if ! apt_install; then
        log "install failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_install
    fi
    missing=$(missing_cmds)
    [[ -z $missing ]] || die "still missing after install: $missing"
    log "installed: $(dpkg-query -W -f='${Package} ${Version}, ' "${PACKAGES[@]}" | sed 's/, $//')"
}

# ------------------------------------------------------------ pid handling --
# A pid file only counts if the process is alive and its executable name is
# the expected one (guards against pid reuse after a reboot or a crash).
pid_of() {  # pid_of FILE [NAME] -> pid in $PID_DIR/FILE.pid if alive and named NAME (default FILE)
    local name=${2:-$1} f=$PID_DIR/$1.pid pid comm
    [[ -f $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name"* ]] || return 1
    echo "$pid"
}

# true if PID exists and is not a zombie (where PID 1 does not reap orphans,
# a stopped daemon can linger as a harmless <defunct> entry)
alive() {
    local st
    [[ -n $1 && -r /proc/$1/status ]] || return 1
    st=$(awk '/^State:/ {print $2; exit}' "/proc/$1/status" 2>/dev/null || true)
    [[ -n $st && $st != Z && $st != X ]]
}

kill_pid() {  # kill_pid NAME PID: TERM, wait up to 15 s, then KILL
    local name=$1 pid=$2 i
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
}

# Daemons started with our config file but whose pid file is gone (e.g. the
# state dir was wiped while they ran). Matched by the full config path, which
# only our own daemons carry on their command line.
strays_of() {  # strays_of NAME
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ $(cat "$d/comm" 2>/dev/null) == "$1" ]] || continue
        alive "$pid" || continue
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-f $CONF " && echo "$pid"
    done
    return 0
}

port_in_use() {  # port_in_use PORT -> true if something accepts on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ------------------------------------------------------------------- stop --
do_stop() {
    local name pid stopped=0
    if [[ -f $CONF ]] && pid_of slurmctld >/dev/null; then
        # cancel leftover jobs so no slurmstepd outlives slurmd
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "cancelling leftover jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 50); do
                [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    for name in slurmd slurmctld; do
        if pid=$(pid_of "$name"); then
            kill_pid "$name" "$pid"
            stopped=1
        fi
        for pid in $(strays_of "$name"); do
            kill_pid "$name (no pid file)" "$pid"
            stopped=1
        done
    done
    # munged only if this script started it (pid file present)
    if pid=$(pid_of munged) || pid=$(PID_DIR=$(dirname "$MUNGE_PIDCOPY") pid_of local_slurm-munged munged); then
        kill_pid munged "$pid"
        stopped=1
    fi
    rm -f "$MUNGE_PIDCOPY"
    if [[ -L $RUN_CONF && $(readlink "$RUN_CONF") == "$CONF" ]]; then
        rm -f "$RUN_CONF"
        rmdir /run/slurm/conf /run/slurm 2>/dev/null || true
    fi
    # clean up everything start created inside the state dir (only in a
    # directory that start set up, see MARKER)
    if [[ -f $MARKER ]]; then
        rm -rf "$PID_DIR" "$LOG_DIR" "$SAVE_DIR" "$SPOOL_DIR" "$CONF" "$MARKER"
        rmdir "$STATE_DIR" 2>/dev/null || true
    fi
    if ((stopped)); then log "stopped; removed state under $STATE_DIR"; else log "nothing was running (state dir $STATE_DIR cleaned)"; fi
}

# ------------------------------------------------------------------ munge --
munge_works() {
    munge -n -S "$MUNGE_SOCKET" </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1
}

start_munge() {
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (is the munge package installed?)"
    install -d -o munge -g munge -m 0700 /etc/munge
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1 || [[ -x /usr/sbin/mungekey ]]; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0600 "$MUNGE_KEY"

    if munge_works; then
        log "munged already running and working on $MUNGE_SOCKET; reusing it (it will not be stopped)"
        return
    fi
    log "starting munged as user munge"
    rm -f /run/munge/munged.pid
    # Foreground mode (-F) in its own session: the pid we record is the
    # daemon itself (no double fork), so `stop` kills exactly this process.
    setsid setpriv --reuid=munge --regid=munge --init-groups -- munged -F --force \
        </dev/null >>"$LOG_DIR/munged.stderr" 2>&1 &
    local i pid=$!
    echo "$pid" >"$PID_DIR/munged.pid"
    echo "$pid" >"$MUNGE_PIDCOPY"
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        munge_works && break
        sleep 0.1
    done
    munge_works || {
        cat "$LOG_DIR/munged.stderr" >&2 2>/dev/null || true
        tail -n 30 /var/log/munge/munged.log >&2 2>/dev/null || true
        die "munged is not answering on $MUNGE_SOCKET"
    }
    log "munged running (pid $(cat "$PID_DIR/munged.pid"))"
}

# ----------------------------------------------------------------- config --
write_conf() {
    local hw node host
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    hw=$(slurmd -C | head -n 1)
    [[ $hw == NodeName=* ]] || die "unexpected 'slurmd -C' output: $hw"
    node=${hw%% *}
    node=${node#NodeName=}
    host=$(hostname -s)
    # keep only the hardware keys (no Gres: this cluster has no GPUs)
    local hwkeys cpus mem
    hwkeys=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    cpus=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus && -n $mem ]] || die "could not read CPUs/RealMemory from: $hw"
    NODE=$node
    log "node $node: ${hwkeys% }"
    cat >"$CONF" <<EOF
# Generated by scripts/local_slurm.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Do not edit: rewritten on every start.
ClusterName=$CLUSTER_NAME
# The name is the host's short name; daemons talk over loopback only.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# cgroup-based tracking/confinement does not work in most containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# keep finished jobs visible to 'squeue --states=all' for 5 minutes (no sacct here)
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MailProg=/bin/true
StateSaveLocation=$SAVE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$PID_DIR/slurmctld.pid
SlurmdPidFile=$PID_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 ${hwkeys% } State=UNKNOWN
# DefMemPerCPU: jobs without --mem get a share, not the whole node
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((mem / cpus))
EOF
    log "wrote $CONF"
    if [[ -e $RUN_CONF && ! -L $RUN_CONF ]] || [[ -L $RUN_CONF && $(readlink "$RUN_CONF") != "$CONF" ]]; then
        log "WARNING: $RUN_CONF exists and is not ours; left alone (srun inside Snakemake jobs may not find this cluster)"
    else
        mkdir -p "$(dirname "$RUN_CONF")"
        ln -sfn "$CONF" "$RUN_CONF"
        log "linked $RUN_CONF -> $CONF (for srun inside jobs, which runs without SLURM_CONF)"
    fi
    if [[ -e /etc/slurm/slurm.conf ]]; then
        log "WARNING: /etc/slurm/slurm.conf exists; commands run without SLURM_CONF (e.g. srun inside Snakemake jobs) will use it, not this cluster"
    fi
}

# ------------------------------------------------------------------ start --
dump_logs() {
    local name f
    # in the foreground the slurm daemons log to both; show the log file, or
    # stderr where they died before opening it (e.g. a config error)
    for name in munged slurmctld slurmd; do
        f=$LOG_DIR/$name.log
        [[ -s $f ]] || f=$LOG_DIR/$name.stderr
        [[ -s $f ]] || continue
        printf '\n----- %s (last 40 lines) -----\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
    if [[ -n ${NODE:-} ]]; then
        printf '\n----- scontrol show node %s -----\n' "$NODE" >&2
        timeout 5 scontrol show node "$NODE" >&2 2>&1 || true
    fi
}

fail_start() {
    printf '[local_slurm] ERROR: %s\n' "$*" >&2
    dump_logs
    log "stopping what was started" >&2
    do_stop >&2 || true
    exit 1
}

start_daemon() {  # start_daemon NAME ARGS...: run NAME in the foreground (-D) in its own session
    local name=$1 i pid
    shift
    log "starting $name"
    setsid "$@" </dev/null >>"$LOG_DIR/$name.stderr" 2>&1 &
    pid=$!
    # the daemon writes the same pid into its own pid file; record it now so
    # that a daemon dying early is still noticed
    echo "$pid" >"$PID_DIR/$name.pid"
    for ((i = 0; i < 20; i++)); do
        sleep 0.1
        alive "$pid" || fail_start "$name exited right after start"
    done
    pid_of "$name" >/dev/null || fail_start "pid $pid is not $name"
    log "$name running (pid $pid)"
}

do_start() {
    need_root start
    ensure_packages
    log "stopping any previous cluster in $STATE_DIR"
    do_stop
    local p
    for p in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (another SLURM?); set LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_SLURMD_PORT or stop it"
    done
    if [[ -d $STATE_DIR && ! -f $MARKER ]] && [[ -n $(ls -A "$STATE_DIR") ]]; then
        die "$STATE_DIR is not empty and was not set up by this script; choose another LOCAL_SLURM_DIR"
    fi
    mkdir -p "$STATE_DIR" "$PID_DIR" "$LOG_DIR" "$SAVE_DIR" "$SPOOL_DIR"
    touch "$MARKER"
    start_munge
    write_conf
    start_daemon slurmctld slurmctld -D -f "$CONF"
    start_daemon slurmd slurmd -D -f "$CONF" -N "$NODE"

    log "waiting up to ${TIMEOUT}s for node $NODE to become idle"
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        pid_of slurmctld >/dev/null || fail_start "slurmctld died"
        pid_of slurmd >/dev/null || fail_start "slurmd died"
        state=$(timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1 || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    [[ $state == idle ]] || fail_start "node $NODE not idle after ${TIMEOUT}s (state: '${state:-unknown}')"
    sinfo
    log "cluster '$CLUSTER_NAME' is up. Use it with:"
    echo "export SLURM_CONF=$CONF"
}

# ----------------------------------------------------------------- status --
do_status() {
    local name pid up=1
    for name in munged slurmctld slurmd; do
        if pid=$(pid_of "$name"); then
            log "$name: running (pid $pid)"
        elif [[ $name == munged ]] && munge_works; then
            log "munged: running (not started by this script)"
        else
            log "$name: not running"
            up=0
        fi
    done
    if ((up)); then
        log "SLURM_CONF=$CONF"
        timeout 10 sinfo || up=0
    fi
    ((up)) || { log "cluster is not running"; return 3; }
}

case ${1:-} in
start) do_start ;;
stop)
    need_root stop
    export PATH=$PATH:/usr/sbin:/sbin
    do_stop
    ;;
status) do_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
