#!/usr/bin/env bash
# Stop the daemons start-cluster.sh started, each by the PID in its PID file, and only when that
# PID still runs the expected program (a recycled PID is left alone). Cancels leftover jobs first
# so no slurmstepd outlives the cluster. Safe to run twice, or when nothing was started.
set -uo pipefail

DIR=${VF_SLURM_DIR:-/tmp/vicunaflow-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf

stop_daemon() { # stop_daemon NAME PIDFILE: TERM, wait up to 10 s, then KILL
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name ($pid) ignored TERM; killing"
      kill -KILL "$pid"
    fi
    echo "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
}

if [ -s "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
  jobs=$(squeue --noheader --format=%i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086  # one job id per word
    scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(squeue --noheader --format=%i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for pidfile in "$DIR"/run/slurmd-*.pid; do stop_daemon slurmd "$pidfile"; done   # one per node
for daemon in slurmctld slurmdbd mariadbd munged; do stop_daemon "$daemon" "$DIR/run/$daemon.pid"; done
exit 0
