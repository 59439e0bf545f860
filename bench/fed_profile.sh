#!/usr/bin/env bash
# fed_profile.sh - fed under bench/fed_vs_postfix.sh's load, one concurrency, with its CPU
# per message and (optionally) a py-spy profile: where a message's time goes.
#
# Starts smtp-sink and fed exactly as fed_vs_postfix.sh does (directory entry
# b@example.test -> b@sink.invalid, relay to the sink, --workers 16), sends 200 warm-up
# messages, then N messages with smtp-source at C clients (a new connection per 2 KB
# message) and prints the accept rate, fed's CPU per message (user + system of every
# process and thread, from /proc) and fed's group-commit log line. With SPY=1 it also runs
# `py-spy record --gil` on every fed process for 4 s in the middle of the load (py-spy is
# a tool for this measurement, not a dependency: `.venv/bin/pip install py-spy`) and
# prints bench/pyspy_shares.py's table of where the GIL time went.
#
# Usage (as root: smtp-sink drops to nobody):  bench/fed_profile.sh [C] [N]
#   SPY=1 bench/fed_profile.sh 10 3000
# PERF=FILE: the measured load's system calls (and context switches) a message, counted by perf
# from the kernel's tracepoints (PERF_SYSCALLS: which; unlike STRACE=FILE it barely slows fed).
# Environment: HOLD=1 (b@example.test held first: accepting without relaying), MSG_SIZE (smtp-source -l, default 2048), FED_PROCESSES (default 1), ports SINK_PORT/SMTP_PORT/CONTROL_PORT
# (defaults 13126/13130/13131), KEEP=1 keeps the work folder (logs, raw profiles).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
C=${1:-1}
N=${2:-2000}
PROCS=${FED_PROCESSES:-1}
SINK_PORT=${SINK_PORT:-13126} SMTP_PORT=${SMTP_PORT:-13130} CONTROL_PORT=${CONTROL_PORT:-13131}
WORK=$(mktemp -d)
SINK_PID="" FED_PID="" SPY_PIDS=()
cleanup() {
  [ -n "$FED_PID" ] && kill -TERM "$FED_PID" 2>/dev/null && wait "$FED_PID" 2>/dev/null || true
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
echo "bench-token-$$" > "$WORK/token"
chmod 600 "$WORK/token"
cd "$REPO"

smtp-sink -u nobody -c "127.0.0.1:$SINK_PORT" 1000 > "$WORK/sink.out" 2>&1 &
SINK_PID=$!
serve() {
  "$PY" -m fed serve --smtp "127.0.0.1:$1" --control "127.0.0.1:$CONTROL_PORT" \
    --state-dir "$WORK/state" --token-file "$WORK/token" --domain example.test \
    --system "sink=127.0.0.1:$SINK_PORT/smtp" --relay-network 127.0.0.0/8 --workers 16 \
    --processes "$PROCS" > "$WORK/fed.out" 2>> "$WORK/fed.err" &
  FED_PID=$!
  for _ in $(seq 100); do grep -q ready "$WORK/fed.out" 2>/dev/null && return; sleep 0.1; done
  echo "fed did not start: $(tail -3 "$WORK/fed.err")" >&2; exit 1
}
serve 0  # fill the directory on a scratch port, then serve the real one on the same state
curl -fsS -X PUT -H "Authorization: Bearer $(cat "$WORK/token")" \
  -H 'Content-Type: application/json' -d '{"physical": "b@sink.invalid"}' \
  "http://127.0.0.1:$CONTROL_PORT/v1/directory/b@example.test" > /dev/null
kill -TERM "$FED_PID"; wait "$FED_PID" || true
serve "$SMTP_PORT"
if [ "${HOLD:-0}" = 1 ]; then  # the accept path alone: the address held, nothing relayed
  curl -fsS -X POST -H "Authorization: Bearer $(cat "$WORK/token")" \
    -H 'Content-Type: application/json' -d '{"addresses": ["b@example.test"]}' \
    "http://127.0.0.1:$CONTROL_PORT/v1/holds" > /dev/null
fi
load() {
  timeout 300 smtp-source -4 -s "$1" -m "$2" -l "${MSG_SIZE:-2048}" -M client.example.test \
    -f a@example.test -t b@example.test "127.0.0.1:$SMTP_PORT"
}
load 50 200  # warm-up
# Every fed process: the node processes of --processes N, or the one process.
PIDS=$FED_PID
if [ "$PROCS" -gt 1 ]; then PIDS="$FED_PID $(pgrep -P "$FED_PID" | tr '\n' ' ')"; fi
jiffies() {  # field 14 utime, 15 stime of every process (threads included)
  local p sum=0 u s
  for p in $PIDS; do read -r u s < <(awk -v f="$1" '{print $14, $15}' "/proc/$p/stat")
    if [ "$1" = user ]; then sum=$((sum + u)); else sum=$((sum + u + s)); fi; done
  echo "$sum"
}
sync; sleep 0.3
if [ "${SPY:-0}" = 1 ]; then
  for p in $PIDS; do
    "$REPO/.venv/bin/py-spy" record --gil --nonblocking -r 500 -f raw -d 4 \
      -o "$WORK/spy.$p.txt" -p "$p" > /dev/null 2>&1 &
    SPY_PIDS+=("$!")
  done
  sleep 0.5
fi
if [ -n "${STRACE:-}" ]; then  # syscall counts of the measured load (slows it down)
  strace -f ${STRACE_OPTS:--c} -o "$STRACE" -p "$FED_PID" & STRACE_PID=$!; sleep 0.5
fi
if [ -n "${PERF:-}" ]; then  # the same counts from the kernel's tracepoints (barely slows it)
  events=$(for s in ${PERF_SYSCALLS:-futex getpid read write writev pwrite64 pwritev2 fcntl \
      fdatasync fsync epoll_wait epoll_pwait epoll_ctl openat close rename unlink accept4 \
      sendto recvfrom io_uring_enter}; do printf 'syscalls:sys_enter_%s,' "$s"; done)
  perf stat -o "$PERF" -e "${events}raw_syscalls:sys_enter,context-switches" \
    -p "$(echo $PIDS | tr ' ' ,)" & PERF_PID=$!; sleep 0.3
fi
all0=$(jiffies all); user0=$(jiffies user); t0=$(date +%s.%N)
load "$C" "$N"
if [ -n "${STRACE:-}" ]; then kill -INT "$STRACE_PID"; wait "$STRACE_PID" || true; fi
if [ -n "${PERF:-}" ]; then kill -INT "$PERF_PID"; wait "$PERF_PID" || true
  awk -v n="$N" '$1 ~ /^[0-9,]+$/ {gsub(",", "", $1); printf "%8.1f a message  %s\n", $1 / n, $2}' "$PERF"
fi
t1=$(date +%s.%N); all1=$(jiffies all); user1=$(jiffies user)
hz=$(getconf CLK_TCK)
awk -v c="$C" -v n="$N" -v t0="$t0" -v t1="$t1" -v a="$((all1 - all0))" \
    -v u="$((user1 - user0))" -v hz="$hz" -v p="$PROCS" 'BEGIN {
  printf "fed --processes %s, %s clients: %.0f messages/s accepted, CPU per message %.2f ms (user %.2f)\n",
         p, c, n / (t1 - t0), 1000 * a / hz / n, 1000 * u / hz / n }'
if [ "${SPY:-0}" = 1 ]; then
  for p in "${SPY_PIDS[@]}"; do wait "$p" || true; done  # py-spy ends after its 4 s
  "$PY" "$HERE/pyspy_shares.py" "$WORK"/spy.*.txt
fi
kill -TERM "$FED_PID"; wait "$FED_PID" || true
FED_PID=""
grep -h "group commit: [1-9]" "$WORK/fed.err" | tail -1 | sed 's/.*INFO fed: //'
