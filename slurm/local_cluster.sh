#!/usr/bin/env bash
# A real single-node Slurm cluster with accounting, for tests and for trying the Slurm presets on one
# machine: munged, MariaDB, slurmdbd, slurmctld and slurmd, every config, socket, spool folder, log
# and PID file under one state folder. Nothing is written to /etc or /var; nothing else is stopped.
#
#   slurm/local_cluster.sh install          # apt-get install slurm-wlm munge slurmdbd mariadb-server (root)
#   slurm/local_cluster.sh start  [STATE]   # STATE: default $ARM_SLURM_STATE or /tmp/arm-slurm
#   slurm/local_cluster.sh status [STATE]
#   slurm/local_cluster.sh stop   [STATE]   # stops the daemons it started, by the PIDs it recorded
#
# After `start`, point the Slurm commands (and the hydra-submitit-launcher, which calls sbatch/sacct)
# at the cluster:   export SLURM_CONF=$STATE/etc/slurm.conf
# Ports (change them when something else listens there): ARM_SLURM_PORT_BASE (default 16817):
# slurmctld = base, slurmd = base+1, slurmdbd = base+2, MariaDB = base+3.
# SLURMD_NICE (default 0): nice value of slurmd, inherited by every job it runs.
# Follows the recipe in NOTES ("A real single-node Slurm cluster"); needs root.
set -euo pipefail

DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop goes in reverse
PASSWORD=arm-slurm-local

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

state_dir() { STATE=$(realpath -m "${1:-${ARM_SLURM_STATE:-/tmp/arm-slurm}}"); }

log() { echo "local_cluster: $*" >&2; }

die() { log "error: $*"; exit 1; }

alive() {  # the process runs: kill -0 answers, and it is not a zombie (one that init has yet to reap)
  kill -0 "$1" 2>/dev/null || return 1
  local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0  # no /proc: kill -0 is all there is
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

pid_of() {  # the recorded PID of a daemon, if the process still runs
  local file="$STATE/run/$1.pid"
  [[ -s $file ]] || return 1
  local pid; pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] && alive "$pid" && echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what: not ready after ${limit}s (logs: $STATE/log)"
    sleep 0.3
  done
}

cmd_install() {
  local missing=()
  for bin in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  ((${#missing[@]})) || { log "slurm-wlm, munge, slurmdbd and mariadb-server are installed"; return 0; }
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; installing them needs root (apt-get)"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing slurm-wlm munge slurmdbd mariadb-server (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

write_configs() {
  local host cpus mem base
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  base=${ARM_SLURM_PORT_BASE:-16817}
  CTLD_PORT=$base; SLURMD_PORT=$((base + 1)); DBD_PORT=$((base + 2)); DB_PORT=$((base + 3))
  MUNGE_SOCKET=$STATE/munge/munge.socket.2
  DB_SOCKET=$STATE/mysql/mysqld.sock

  cat >"$STATE/etc/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: one node, accounting through slurmdbd + MariaDB.
ClusterName=armlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
KillWait=5
MinJobAge=600
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# The munge socket for talking to slurmdbd (AuthInfo covers the other connections).
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  cat >"$STATE/etc/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$PASSWORD
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/etc/slurmdbd.conf"   # slurmdbd refuses a readable one
}

start_munged() {
  local dir=$STATE/munge
  mkdir -p "$dir"
  [[ -s $dir/munge.key ]] || mungekey --create --keyfile="$dir/munge.key" >/dev/null
  chown -R munge:munge "$dir"
  chmod 755 "$dir"; chmod 600 "$dir/munge.key"
  # munged runs as user munge (it refuses to run as root).
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$dir/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
  wait_for 10 munged test -s "$dir/munged.pid"
  cp "$dir/munged.pid" "$STATE/run/munged.pid"
  wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n
}

start_mariadbd() {
  local data=$STATE/mysql/data
  mkdir -p "$STATE/mysql"
  if [[ ! -d $data/mysql ]]; then
    mariadb-install-db --no-defaults --datadir="$data" --user=root --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
  fi
  mariadbd --no-defaults --datadir="$data" --user=root --socket="$DB_SOCKET" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadb.log" \
    --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
    --skip-log-bin --performance-schema=OFF </dev/null >/dev/null 2>&1 &
  disown
  wait_for 60 mariadbd mariadb --no-defaults --socket="$DB_SOCKET" -u root -e 'SELECT 1'
  mariadb --no-defaults --socket="$DB_SOCKET" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$PASSWORD';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "start needs root (the daemons run as root and munge)"
  for bin in slurmctld slurmd slurmdbd munged mariadbd; do
    command -v "$bin" >/dev/null || die "$bin is not installed: run '$0 install' first"
  done
  for daemon in "${DAEMONS[@]}"; do
    if pid=$(pid_of "$daemon"); then die "$daemon already runs from $STATE (pid $pid): '$0 stop $STATE' first"; fi
  done
  mkdir -p "$STATE"/{etc,run,log,spool/slurmctld,spool/slurmd}
  trap 'log "start failed: stopping what it started"; cmd_stop' EXIT
  chmod 755 "$STATE"   # user munge must reach its socket folder
  write_configs
  export SLURM_CONF=$STATE/etc/slurm.conf
  start_munged
  start_mariadbd
  slurmdbd   # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 30 slurmdbd test -s "$STATE/run/slurmdbd.pid"
  wait_for 30 "slurmdbd (sacctmgr)" sacctmgr -n list cluster
  # The cluster must exist in the database before slurmctld registers to it.
  sacctmgr -n list cluster format=cluster | grep -qw armlocal || sacctmgr -i add cluster armlocal >/dev/null
  slurmctld -f "$SLURM_CONF"
  wait_for 30 slurmctld test -s "$STATE/run/slurmctld.pid"
  nice -n "${SLURMD_NICE:-0}" slurmd -f "$SLURM_CONF"
  wait_for 30 slurmd test -s "$STATE/run/slurmd.pid"
  wait_for 60 "node idle (sinfo)" node_idle
  wait_for 30 "accounting (sacct)" sacct -n -X -S now
  trap - EXIT
  log "up: $(sinfo -h -o '%N %C %t' | head -1) (nodes: cpus alloc/idle/other/total, state)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

node_idle() { sinfo -h -o '%t' | grep -qx 'idle'; }

cmd_stop() {
  local rc=0
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    local daemon=${DAEMONS[i]} pid
    pid=$(pid_of "$daemon") || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      log "$daemon (pid $pid) ignored SIGTERM for 20s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || rc=1
    fi
    rm -f "$STATE/run/$daemon.pid"
    log "stopped $daemon (pid $pid)"
  done
  return $rc
}

cmd_status() {
  local down=0
  for daemon in "${DAEMONS[@]}"; do
    if pid=$(pid_of "$daemon"); then echo "$daemon: running (pid $pid)"; else echo "$daemon: stopped"; down=1; fi
  done
  if ((down == 0)); then
    SLURM_CONF=$STATE/etc/slurm.conf sinfo
    echo "export SLURM_CONF=$STATE/etc/slurm.conf"
  fi
  return $down
}

action=${1:-}
state_dir "${2:-}"
case $action in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) usage ;;
esac
