#!/usr/bin/env bash
# fed_vs_postfix.sh - fed next to Postfix, in the same run, at several concurrencies.
#
# Runs the peer harness ../shared/bench/postfix_relay.sh with fed plugged in as its extra
# server: fed listens on $EXTRA_PORT, its directory maps the harness's recipient
# b@example.test to a physical address on a system "sink" (the harness's smtp-sink), so
# fed durably spools each message (group commit, fsync before 250) and then relays it,
# exactly the path a migrated mailbox's mail takes. Prints the harness's table, then fed's
# accept and e2e rates as ratios to Postfix's at each concurrency; the LAST line is
#   fed/postfix e2e ratio at 50 clients: X.XX
# (or at the largest concurrency in the list, if 50 is not in it).
#
# Usage (as root, like the harness):  bench/fed_vs_postfix.sh [N] [CONCURRENCY_LIST]
#   bench/fed_vs_postfix.sh 2000 "1 10 50"
# Environment: SERVERS (default "postfix"; add the aiosmtpd baselines if wanted),
# FED_WORKERS (connections per destination, default 16), FED_PROCESSES (fed serve
# --processes: node processes behind the one port, default 2), ports (defaults differ from the
# harness's so that a colleague's run of the harness does not collide), FED_ARGS (extra).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# ORDER (default "postfix-first", the harness's own order: its servers, then the extra):
#   "fed-first"  fed alone through the harness, then Postfix alone right after it (two
#                harness runs back to back, each with its own sink and probes);
#   "both"       postfix-first, then fed-first, then each concurrency's geometric mean of
#                the two e2e ratios. Why: on this machine whichever server runs second
#                meets the kernel state the first one's thousands of files and connections
#                left (measured 2026-12-07: fed's kernel time a message doubles right after
#                a Postfix run, user time unchanged; Postfix after fed loses 10-20 %), so
#                one order alone favours the server that goes first.
# shellcheck source=peer_harness.sh
. "$HERE/peer_harness.sh"  # HARNESS, PY
N=${1:-2000}
CONCS=${2:-"1 10 50"}
export SERVERS=${SERVERS-postfix}
export RELAY_PORT=${RELAY_PORT:-12025} SINK_PORT=${SINK_PORT:-12026}
export PY_PORT_BASE=${PY_PORT_BASE:-12027} EXTRA_PORT=${EXTRA_PORT:-12030}
CONTROL_PORT=${CONTROL_PORT:-12031}
FED_WORKERS=${FED_WORKERS:-16}
FED_PROCESSES=${FED_PROCESSES:-2}
FED_ARGS=${FED_ARGS:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "bench-token-$$" > "$WORK/token"

# The extra server: fed. Its directory is filled first by a fed on scratch ports (the harness
# starts sending as soon as $EXTRA_PORT accepts), then fed restarts on the same state folder.
cat > "$WORK/fed.sh" <<SH
#!/usr/bin/env bash
set -euo pipefail
serve() {
  "$PY" -m fed serve --smtp 127.0.0.1:\$1 --control 127.0.0.1:$CONTROL_PORT \\
    --state-dir "$WORK/state" --token-file "$WORK/token" --domain example.test \\
    --system sink=127.0.0.1:\$SINK_PORT/smtp --relay-network 127.0.0.0/8 --workers $FED_WORKERS --processes $FED_PROCESSES $FED_ARGS \\
    > "$WORK/fed.out" 2>> "$WORK/fed.err" &
  pid=\$!
  for _ in \$(seq 100); do grep -q ready "$WORK/fed.out" 2>/dev/null && break; sleep 0.1; done
}
serve 0
curl -fsS -X PUT -H "Authorization: Bearer \$(cat "$WORK/token")" \\
  -H 'Content-Type: application/json' -d '{"physical": "b@sink.invalid"}' \\
  http://127.0.0.1:$CONTROL_PORT/v1/directory/b@example.test > /dev/null
kill -TERM \$pid; wait \$pid || true
serve $EXTRA_PORT
trap 'kill -TERM \$pid' TERM
wait \$pid
SH
chmod +x "$WORK/fed.sh"

ORDER=${ORDER:-postfix-first}
# harness TABLE_FILE SERVERS WITH_FED: one run of the peer harness, its table kept
harness() {
  if [ "$3" = 1 ]; then
    SERVERS="$2" EXTRA_NAME=fed EXTRA_CMD="exec $WORK/fed.sh" bash "$HARNESS" "$N" "$CONCS" | tee "$1"
    grep -h "group commit" "$WORK/fed.err" | tail -1 || true
  else
    SERVERS="$2" EXTRA_CMD="" bash "$HARNESS" "$N" "$CONCS" | tee "$1"
  fi
}
# ratios TABLE_FILE...: fed/Postfix accept and e2e rates at each concurrency
ratios() {
  awk -v concs="$CONCS" '
    $1 == "postfix" { pa[$2]=$5; pe[$2]=$7 }
    $1 == "fed"     { fa[$2]=$5; fe[$2]=$7 }
    function ratio(a, b) { return (a + 0 > 0 && b + 0 > 0) ? sprintf("%.2f", a / b) : "n/a" }
    END {
      n = split(concs, cs, " ");
      printf "%-8s %12s %12s %12s %12s %14s %12s\n", "clients", "fed acc/s", "postfix acc/s",
             "fed e2e/s", "postfix e2e/s", "accept ratio", "e2e ratio";
      last = cs[n];
      for (i = 1; i <= n; i++) {
        c = cs[i]; if (c == 50) last = 50;
        printf "%-8s %12s %12s %12s %12s %14s %12s\n", c, fa[c], pa[c], fe[c], pe[c],
               ratio(fa[c], pa[c]), ratio(fe[c], pe[c]);
      }
      printf "fed/postfix e2e ratio at %s clients: %s\n", last, ratio(fe[last], pe[last]);
    }' "$@"
}
echo "fed: --processes $FED_PROCESSES --workers $FED_WORKERS; order: $ORDER"
case $ORDER in
  postfix-first)
    harness "$WORK/table.txt" "$SERVERS" 1
    ratios "$WORK/table.txt" ;;
  fed-first)
    harness "$WORK/fed.txt" "" 1
    harness "$WORK/postfix.txt" "$SERVERS" 0
    ratios "$WORK/fed.txt" "$WORK/postfix.txt" ;;
  both)
    harness "$WORK/table.txt" "$SERVERS" 1
    echo "== postfix first"; ratios "$WORK/table.txt" | tee "$WORK/r1.txt"
    harness "$WORK/fed.txt" "" 1
    harness "$WORK/postfix.txt" "$SERVERS" 0
    echo "== fed first"; ratios "$WORK/fed.txt" "$WORK/postfix.txt" | tee "$WORK/r2.txt"
    echo "== both orders: geometric mean of the two e2e ratios"
    awk 'FNR == 1 { f++ } $1 ~ /^[0-9]+$/ { r[f, $1] = $7; cs[$1] = 1 }
      END { for (c in cs) if (r[1, c] + 0 > 0 && r[2, c] + 0 > 0)
              printf "%s clients: %.2f (%.2f / %.2f)\n", c, sqrt(r[1, c] * r[2, c]), r[1, c], r[2, c] }' \
      "$WORK/r1.txt" "$WORK/r2.txt" | sort -n
    ratios "$WORK/table.txt" | tail -1 ;;
  *) echo "fed_vs_postfix: ORDER must be postfix-first, fed-first or both" >&2; exit 2 ;;
esac
