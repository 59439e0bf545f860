#!/usr/bin/env bash
# fed_vs_postfix.sh - fed next to Postfix and the aiosmtpd baselines, in the same run.
#
# Runs the peer harness ../shared/bench/postfix_relay.sh with fed plugged in as its extra
# server: fed listens on $EXTRA_PORT, its directory maps the harness's recipient
# b@example.test to a physical address on a system "sink" (the harness's smtp-sink), so
# fed durably spools each message (fsync before 250) and then relays it, exactly the path
# a migrated mailbox's mail takes. Prints the harness's table, then fed's rates as ratios
# to Postfix's at each concurrency; the last line reads `fed/postfix e2e ratio (C=10): X.XX`.
#
# Usage (as root, like the harness):  bench/fed_vs_postfix.sh [N] [CONCURRENCY_LIST]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HARNESS=${HARNESS:-$REPO/../shared/bench/postfix_relay.sh}
[ -x "$HARNESS" ] || [ -f "$HARNESS" ] || { echo "peer harness not found: $HARNESS" >&2; exit 1; }
PY=${PY:-$REPO/.venv/bin/python}
N=${1:-3000}
CONCS=${2:-"1 10 50"}
export EXTRA_PORT=${EXTRA_PORT:-10030}
CONTROL_PORT=${CONTROL_PORT:-10031}
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
    --system sink=127.0.0.1:\$SINK_PORT/smtp --workers 16 > "$WORK/fed.out" 2>> "$WORK/fed.err" &
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

OUT="$WORK/table.txt"
EXTRA_NAME=fed EXTRA_CMD="exec $WORK/fed.sh" bash "$HARNESS" "$N" "$CONCS" | tee "$OUT"

# Ratios: the harness prints "server conc N accept_s accept/s e2e_s e2e/s cpu% iow% status".
awk '
  $1 == "postfix" { pa[$2]=$5; pe[$2]=$7 }
  $1 == "fed"     { fa[$2]=$5; fe[$2]=$7 }
  END {
    for (c in fa) if (pa[c] + 0 > 0 && pe[c] + 0 > 0)
      printf "C=%s: fed/postfix accept %.2f, e2e %.2f\n", c, fa[c] / pa[c], fe[c] / pe[c];
    if (pe[10] + 0 > 0) printf "fed/postfix e2e ratio (C=10): %.2f\n", fe[10] / pe[10];
  }' "$OUT"
