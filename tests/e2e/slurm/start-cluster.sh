#!/usr/bin/env bash
# A real SLURM cluster of one or two nodes on 127.0.0.1 for the end-to-end test (tests/e2e/test_slurm.py):
# munged, MariaDB + slurmdbd (so `sacct` answers, which the Snakemake SLURM executor polls),
# slurmctld and a slurmd per node with fake GPUs. Runs as root, without systemd; every daemon writes its PID
# under $VF_SLURM_DIR so stop-cluster.sh can stop exactly what was started here.
#
#   tests/e2e/slurm/start-cluster.sh          start (a daemon whose PID file is alive is kept)
#   source $VF_SLURM_DIR/env.sh               SLURM_CONF, and the srun shim first on PATH
#   tests/e2e/slurm/stop-cluster.sh           stop every daemon by its PID
#
# Settings (environment): VF_SLURM_DIR (default /tmp/vicunaflow-slurm), VF_SLURM_NODES (1 or 2),
# VF_SLURM_GPUS (fake GPUs per node, 2), VF_SLURM_ACCOUNT (ci), VF_SLURM_PORT_BASE (6817:
# slurmctld, +2 slurmdbd, +10+i slurmd of node i), VF_SLURM_DB_PORT (13306),
# VF_SLURM_FRESH=1 wipes job and accounting state first. Exit status 3: not root, or the Slurm
# packages are missing and cannot be installed (the tests skip); anything else non-zero is a failure.
#
# Two nodes are two slurmd on this host (Debian builds Slurm with multiple-slurmd support), named
# after this host and `localhost` so that both names resolve, as real node names do: a multi-node
# job then starts one task per node and its processes meet at a rendezvous on the first node.
set -euo pipefail

DIR=${VF_SLURM_DIR:-/tmp/vicunaflow-slurm}
NODES=${VF_SLURM_NODES:-1}
GPUS=${VF_SLURM_GPUS:-2}
ACCOUNT=${VF_SLURM_ACCOUNT:-ci}
PORT=${VF_SLURM_PORT_BASE:-6817}
DB_PORT=${VF_SLURM_DB_PORT:-13306}
HOST=$(hostname -s)
case $NODES in
  1) NODE_NAMES=("$HOST") ;;
  2) NODE_NAMES=("$HOST" localhost) ;;
  *) echo "start-cluster.sh: VF_SLURM_NODES must be 1 or 2" >&2; exit 2 ;;
esac
STARTED=$(date +%s%N)

say() {
  local ms=$(( ($(date +%s%N) - STARTED) / 1000000 ))
  printf '[slurm +%d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"
}
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# until_ok SECONDS COMMAND...: poll a readiness check, never wait unbounded.
until_ok() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "gave up waiting for: $*" >&2; return 1; fi
    sleep 0.2
  done
}

[ "$(id -u)" = 0 ] || { echo "start-cluster.sh: needs root (daemons, mknod)" >&2; exit 3; }

# ---- packages: Debian 12 ships Slurm 22.05 --------------------------------------------------------
packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for package in "${packages[@]}"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # The packages' own init scripts cannot start anything here (no systemd); we start the daemons below.
  # Exit status 3: the packages cannot be had here (tests skip on it; any other failure is a bug).
  apt-get update -qq || exit 3
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || exit 3
fi
say "packages present"

if [ "${VF_SLURM_FRESH:-0}" = 1 ]; then
  "$(dirname "$0")/stop-cluster.sh" || true
  rm -rf "$DIR"/{state,spool,db,log}
fi
mkdir -p "$DIR"/{etc,munge,state,spool,log,run,dev,bin,db}
chmod 0755 "$DIR" "$DIR/munge"   # munged rejects a socket directory writable by group or others
MUNGE_SOCKET=$DIR/munge/munge.socket.2

# ---- configuration --------------------------------------------------------------------------------
CPUS=$(nproc)
MEMORY_MB=$(awk -v nodes="$NODES" '/^MemTotal:/ {print int($2 / 1024 * 0.9 / nodes)}' /proc/meminfo)
cat > "$DIR/etc/slurm.conf" <<EOF
# Written by tests/e2e/slurm/start-cluster.sh: one node, fake GPUs, accounting through slurmdbd.
ClusterName=vicunaflow
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCKET}
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
# No mail daemon here; without MailProg slurmctld logs an error for every job.
MailProg=/bin/true
# Cgroup device control does not work in this sandbox: track processes by /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job without --mem would otherwise take the node's whole memory and serialise everything.
DefMemPerCPU=1000
ReturnToService=2
# Finished jobs stay visible to squeue for 5 minutes (sacct keeps them for good).
MinJobAge=300
KillWait=5
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
# slurmctld reaches slurmdbd through munge; for that connection it reads the socket from here.
AccountingStoragePass=${MUNGE_SOCKET}
AccountingStorageTRES=gres/gpu
# Keep sbatch --comment (the Snakemake executor writes the rule and wildcards there) for sacct.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# Fake GPUs: character devices with /dev/null's numbers. Slurm schedules them and sets
# CUDA_VISIBLE_DEVICES; nothing can use them as a GPU, so jobs fall back to the CPU.
echo "AutoDetect=off" > "$DIR/etc/gres.conf"
for ((node = 0; node < NODES; node++)); do
  name=${NODE_NAMES[$node]}
  echo "NodeName=${name} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((PORT + 10 + node))" \
    "CPUs=${CPUS} RealMemory=${MEMORY_MB} Gres=gpu:fake:${GPUS} State=UNKNOWN" >> "$DIR/etc/slurm.conf"
  mkdir -p "$DIR/dev/$name"
  for ((index = 0; index < GPUS; index++)); do
    [ -e "$DIR/dev/$name/nvidia$index" ] || mknod "$DIR/dev/$name/nvidia$index" c 1 3
  done
  echo "NodeName=${name} Name=gpu Type=fake File=${DIR}/dev/${name}/nvidia[0-$((GPUS - 1))]" >> "$DIR/etc/gres.conf"
done

cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCKET}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=root
StorageLoc=vicunaflow_slurm_acct
PidFile=${DIR}/run/slurmdbd.pid
LogFile=${DIR}/log/slurmdbd.log
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"   # slurmdbd refuses a readable config

# The Snakemake job step (snakemake-executor-plugin-slurm-jobstep) removes every SLURM_* variable,
# SLURM_CONF included, before its own srun; this shim, first on PATH, puts SLURM_CONF back.
cat > "$DIR/bin/srun" <<EOF
#!/bin/sh
SLURM_CONF=\${SLURM_CONF:-${DIR}/etc/slurm.conf} exec /usr/bin/srun "\$@"
EOF
chmod 0755 "$DIR/bin/srun"
cat > "$DIR/env.sh" <<EOF
export SLURM_CONF=${DIR}/etc/slurm.conf
case ":\$PATH:" in *":${DIR}/bin:"*) ;; *) export PATH=${DIR}/bin:\$PATH ;; esac
EOF
export SLURM_CONF=$DIR/etc/slurm.conf
say "configuration written to $DIR/etc"

# ---- munge ----------------------------------------------------------------------------------------
if [ ! -s "$DIR/munge/munge.key" ]; then
  head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
  chmod 0400 "$DIR/munge/munge.key"
fi
running "$DIR/run/munged.pid" || munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
  --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" --force
until_ok 10 munge --socket="$MUNGE_SOCKET" --no-input
say "munged $(cat "$DIR/run/munged.pid")"

# ---- MariaDB + slurmdbd: the accounting sacct reads ------------------------------------------------
if [ ! -d "$DIR/db/data/mysql" ]; then
  mariadb-install-db --no-defaults --user=root --datadir="$DIR/db/data" --skip-test-db \
    --auth-root-authentication-method=normal --innodb-log-file-size=16M > "$DIR/log/mariadb-install.log" 2>&1
fi
if ! running "$DIR/run/mariadbd.pid"; then
  setsid mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$DIR/db/mariadb.sock" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" \
    --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
    --innodb-lock-wait-timeout=900 \
    < /dev/null > /dev/null 2>&1 &
fi
until_ok 60 mariadb-admin --no-defaults --user=root --socket="$DIR/db/mariadb.sock" ping
say "mariadbd $(cat "$DIR/run/mariadbd.pid")"
# slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF.
running "$DIR/run/slurmdbd.pid" || slurmdbd
until_ok 30 sacctmgr --noheader list cluster
say "slurmdbd $(cat "$DIR/run/slurmdbd.pid")"

# ---- slurmctld + slurmd ---------------------------------------------------------------------------
running "$DIR/run/slurmctld.pid" || slurmctld
until_ok 30 scontrol ping
say "slurmctld $(cat "$DIR/run/slurmctld.pid")"
node_ready() { sinfo --noheader --nodes="$1" --format=%T | grep -Eq '^(idle|mixed|allocated)$'; }
for name in "${NODE_NAMES[@]}"; do
  running "$DIR/run/slurmd-$name.pid" || slurmd -N "$name"
  if ! until_ok 20 node_ready "$name"; then
    scontrol update NodeName="$name" State=RESUME || true   # a node left DOWN by an earlier run
    until_ok 20 node_ready "$name"
  fi
  say "slurmd $(cat "$DIR/run/slurmd-$name.pid"), node $name $(sinfo --noheader --nodes="$name" --format=%T)"
done

# ---- accounts: the executor plugin validates slurm_account against sacctmgr ------------------------
until_ok 30 bash -c "sacctmgr --noheader list cluster format=cluster | grep -qw vicunaflow"
sacctmgr --immediate --quiet add account "$ACCOUNT" Description=vicunaflow-tests Organization=vicunaflow \
  > /dev/null 2>&1 || true
sacctmgr --immediate --quiet add user root Account="$ACCOUNT" > /dev/null 2>&1 || true
until_ok 10 bash -c "sacctmgr --noheader --parsable2 list user root withassoc format=account | grep -qx $ACCOUNT"
say "ready: partition debug, account $ACCOUNT, $NODES node(s) x $GPUS fake GPUs; source $DIR/env.sh"
