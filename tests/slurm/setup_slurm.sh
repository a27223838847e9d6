#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (Debian 12, root), for tests/test_launch.py's
# `slurm`-marked test:
#
#     bash tests/slurm/setup_slurm.sh            # install + configure + start (idempotent)
#     .venv/bin/python -m pytest -q -m slurm tests/test_launch.py
#     bash tests/slurm/setup_slurm.sh --stop     # stop the daemons again
#
# What it does:
#   1. apt-get install -y slurm-wlm munge (Debian's packages; slurm 22.05 on bookworm);
#   2. a munge key (if the package did not make one) and munged;
#   3. /etc/slurm/slurm.conf for one node "localhost" without cgroups
#      (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting, no gres),
#      CPUs and RealMemory taken from `slurmd -C`, one partition "debug";
#   4. slurmctld and slurmd (as root, in the background, logs in /var/log/slurm), then waits until
#      the node is idle.
# Containers without systemd are fine: nothing here goes through systemctl.
# Env: SLURM_SETUP_SKIP_INSTALL=1 skips apt-get (packages already there).
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd

log() { echo "[setup_slurm] $*"; }
die() { echo "[setup_slurm] error: $*" >&2; exit 1; }

stop_daemons() {
    # Only the daemons this script started: found by their pid files, and only if the pid still
    # belongs to that daemon (a stale pid file may name an unrelated process by now).
    local f name pid
    for f in /run/slurmd.pid:slurmd /run/slurmctld.pid:slurmctld /run/munge/munged.pid:munged; do
        name=${f#*:}; f=${f%%:*}
        [[ -f $f ]] || continue
        pid=$(cat "$f" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
            log "stopping $name (pid $pid)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$f"
    done
}

if [[ ${1:-} == --stop ]]; then
    stop_daemons
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, daemons in /run and /var/spool)"

# ---------------------------------------------------------------- 1. packages
if [[ ${SLURM_SETUP_SKIP_INSTALL:-0} != 1 ]] && \
   ! { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' postinst scripts try to start services; without an init system that is
    # harmless (they fail softly) and we start the daemons ourselves below.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/tmp/setup_slurm_apt.log 2>&1 || {
        tail -30 /tmp/setup_slurm_apt.log >&2
        die "apt-get install slurm-wlm munge failed (log: /tmp/setup_slurm_apt.log)"
    }
fi
for tool in slurmctld slurmd sbatch squeue scontrol munged; do
    command -v "$tool" >/dev/null || die "$tool not found after installation"
done

stop_daemons  # restart cleanly: a new slurm.conf needs new daemons

# ---------------------------------------------------------------- 2. munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile /etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
log "starting munged"
runuser -u munge -- /usr/sbin/munged --pid-file /run/munge/munged.pid
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# ---------------------------------------------------------------- 3. slurm.conf
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
# `slurmd -C` prints this machine's NodeName line: "NodeName=vm CPUs=2 Boards=1 ... RealMemory=23990".
hw=$(slurmd -C | head -1)
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ -n $cpus && -n $mem ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $hw"
# Keep a little memory back for the daemons themselves.
mem=$(( mem > 2048 ? mem - 1024 : mem ))
log "node localhost: CPUs=$cpus RealMemory=$mem (from: $hw)"

cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by tests/slurm/setup_slurm.sh: a one-node test cluster, no cgroups, no accounting.
ClusterName=tstlocal
SlurmctldHost=localhost
AuthType=auth/munge
CryptoType=crypto/munge
# step credentials live 30 s (default 120); this is also how long a requeued job waits to restart
AuthInfo=cred_expire=30
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# cgroup-free process tracking and task launch
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# jobs stay visible to 'scontrol show job' for 10 minutes after they end
MinJobAge=600
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# ---------------------------------------------------------------- 4. daemons
log "starting slurmctld"
slurmctld -c   # -c: a clean controller, no jobs or state from a previous run
log "starting slurmd"
slurmd -N localhost

for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)
    [[ $state == idle* ]] && break
    sleep 1
done
state=$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)
if [[ $state != idle* ]]; then
    scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    sleep 2
    state=$(sinfo -h -n localhost -o '%T' 2>/dev/null || true)
fi
[[ $state == idle* ]] || {
    tail -20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node localhost is '$state', not idle"
}
log "ready: $(sinfo -h -o '%P %a %D %T %N' | head -1)"
