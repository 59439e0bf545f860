#!/usr/bin/env bash
# smtp_floor.sh - what bounds fed at one client: the floor of a Python SMTP server, next to
# Postfix and fed in the same run of the peer harness.
#
# Runs ../shared/bench/postfix_relay.sh three times back to back, each with Postfix and one
# extra server in its extra slot (accept rate only, EXTRA_RELAYS=0, except fed):
#   floor-canned   bench/smtp_floor.py: fixed replies on uvloop, nothing else
#   floor-durable  the same plus one pwrite over an existing file and its fdatasync before
#                  the 250 (the least a server that keeps invariant 1 can do)
#   fed            bench/fed_vs_postfix.sh's fed (spool, index, relay to the sink)
# and prints each one's accept rate as a ratio to the Postfix of its own run. The issue's
# target is fed >= 1.5x Postfix; if floor-durable is below that at a concurrency, no
# Python asyncio server with fsync-before-250 reaches it on this machine there.
#
# Usage (as root, like the harness):  bench/smtp_floor.sh [N] [CONCURRENCY_LIST]
#   bench/smtp_floor.sh 2000 "1 10"
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=peer_harness.sh
. "$HERE/peer_harness.sh"  # HARNESS, PY
N=${1:-2000}
CONCS=${2:-"1 10"}
export RELAY_PORT=${RELAY_PORT:-14025} SINK_PORT=${SINK_PORT:-14026}
export PY_PORT_BASE=${PY_PORT_BASE:-14027} EXTRA_PORT=${EXTRA_PORT:-14030}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

for mode in canned durable; do
  SERVERS=postfix EXTRA_NAME="floor-$mode" EXTRA_RELAYS=0 \
    EXTRA_CMD="exec $PY $HERE/smtp_floor.py --port $EXTRA_PORT --mode $mode" \
    bash "$HARNESS" "$N" "$CONCS" > "$WORK/$mode.txt" 2> "$WORK/$mode.err"
done
SERVERS=postfix EXTRA_PORT=$EXTRA_PORT CONTROL_PORT=$((EXTRA_PORT + 1)) \
  bash "$HERE/fed_vs_postfix.sh" "$N" "$CONCS" > "$WORK/fed.txt" 2> "$WORK/fed.err"

# Each table: "server conc N accept_s accept/s e2e_s e2e/s cpu% iow% status".
printf '%-8s %-14s %10s %12s %8s\n' clients server "accept/s" "postfix/s" ratio
for c in $CONCS; do
  for f in canned durable fed; do
    awk -v c="$c" -v f="$f" '
      $2 == c && $1 == "postfix" { p = $5 }
      $2 == c && $1 != "postfix" && $1 != "server" && $10 == "ok" { x = $5; name = $1 }
      END { if (p > 0 && x > 0) printf "%-8s %-14s %10d %12d %8.2f\n", c, name, x, p, x / p }
    ' "$WORK/$f.txt"
  done
done
