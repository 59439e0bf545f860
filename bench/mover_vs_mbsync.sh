#!/usr/bin/env bash
# mailferry's data mover against mbsync (sequential and 4 in parallel) and `doveadm backup`,
# on the same data, in the same run of the peer harness ../shared/bench/imap_copy.sh (two
# private Dovecot instances, populated Maildirs, verification of every copy: BADCOPY if the
# target is not identical to the source).
#
# The mover runs as the harness's EXTRA_CMD with `--rerun`: after the copy (verification
# included) it runs a second full pass that must find nothing to copy. Both passes are
# inside the harness's timed wall, so the mover's rate below is conservative; the mover's
# own stats (first pass, re-run, peak RSS) are printed too.
#
# Usage (as root, from anywhere):
#   bench/mover_vs_mbsync.sh [USERS] [MSGS_PER_USER]      default 20 500 (10 000 messages)
#   MEM_CHECK=1 bench/mover_vs_mbsync.sh                  also: one 10 000-message mailbox,
#                                                         mover only, peak memory
# Knobs: PARALLEL_MOVER (mailboxes at once, default 8; in each process), PROCESSES_MOVER
# (`copy --processes`, default 1; the peers' -par rows run PARALLEL=4 processes), METHODS
# (peers, default "mbsync-seq mbsync-par doveadm-par"), anything imap_copy.sh reads
# (AVG_SIZE, ...). DIRECT=1: `--dst-dovecot-config` with the harness's target configuration
# (the file its doveadm gets): big messages written into the target's Maildir, as doveadm
# writes them (docs/data-mover.md, "A Dovecot of this machine as target").
# COLD_RERUN=1 adds a third pass in a *new process* (Python start, state store, fresh
# logins: what a later invocation pays; `--rerun` reuses the first pass's connections; the
# source unchanged, it leaves the target unread), then bench/imap_login_floor.py: the same
# logins and LIST-STATUS and nothing else, on both sides and on the source only (the
# floors). It
# runs inside the harness's timed wall too, so the mover's rates drop with it: compare
# ratios from runs without it.
# The last line is always `mover/mbsync-4 ratio: X.XX` (0.00 when a method failed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HARNESS=${PEER_HARNESS:-$REPO/../shared/bench/imap_copy.sh}  # PEER_HARNESS: from a worktree
[[ -f $HARNESS ]] || { echo "mover_vs_mbsync: peer harness not found at $HARNESS" \
    "(expected ../shared/bench/ next to the repository)" >&2; exit 1; }
PY=${MOVER_PYTHON:-$REPO/.venv/bin/python}
[[ -x $PY ]] || { echo "mover_vs_mbsync: $PY missing (run ./bootstrap.sh test first)" >&2; exit 1; }

# The mover's processes read bytecode as an installed mover does (pip compiles on install):
# under PYTHONDONTWRITEBYTECODE=1, as set on this machine, a source tree would otherwise be
# compiled afresh by every process (40 ms of CPU each, most of a cold no-op pass's start).
"$PY" -m compileall -q "$REPO/mailferry" "$REPO/reconciler" >/dev/null

USERS=${1:-20}
MSGS=${2:-500}
PARALLEL_MOVER=${PARALLEL_MOVER:-8}
PROCESSES_MOVER=${PROCESSES_MOVER:-1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"

# mover_cmd STATS_FILE: the EXTRA_CMD line (single-quoted variables expand in the harness)
mover_cmd() {
    local copy="'$PY' -m reconciler.mover copy --src 127.0.0.1:\$SRC_PORT"
    copy+=" --dst 127.0.0.1:\$DST_PORT --users \$USERS_FILE --state '$1.db'"
    copy+=" --progress none --parallel $PARALLEL_MOVER --processes $PROCESSES_MOVER"
    # DIRECT=1: the harness exports its target's configuration file as DST_CONF
    [[ ${DIRECT:-0} == 1 ]] && copy+=" --dst-dovecot-config \$DST_CONF"
    if [[ ${COLD_RERUN:-0} == 1 ]]; then
        echo "cd '$REPO' && $copy --rerun --stats '$1' && t0=\$(date +%s.%N) &&" \
            "$copy --stats '$1.cold' && echo \$t0 \$(date +%s.%N) > '$1.coldwall' &&" \
            "'$PY' bench/imap_login_floor.py $PARALLEL_MOVER > '$1.floor'"
    else
        echo "cd '$REPO' && exec $copy --rerun --stats '$1'"
    fi
}

run_harness() {  # run_harness OUT STATS USERS MSGS METHODS
    EXTRA_NAME=mover EXTRA_CMD=$(mover_cmd "$2") METHODS=$5 \
        bash "$HARNESS" "$3" "$4" | tee "$1"
}

run_harness "$WORK/table.txt" "$WORK/stats.json" "$USERS" "$MSGS" \
    "${METHODS-mbsync-seq mbsync-par doveadm-par}"

rate() {  # rate METHOD COLUMN(3 msgs/s, 4 MB/s) -> number or empty
    awk -v m="$1" -v c="$2" '$1 == m && $7 == "ok" {print $c}' "$WORK/table.txt"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b == 0) print "0.00";
    else printf "%.2f", a / b }'; }

echo
echo "== mover vs peers (same run; rates of the mover include its verification and a re-run pass)"
printf '%-12s %10s %8s %16s %16s\n' method msgs/s MB/s "mover/x (msgs)" "mover/x (MB)"
MM=$(rate mover 3); MB=$(rate mover 4)
for m in mbsync-seq mbsync-par doveadm-seq doveadm-par python-par mover; do
    r=$(rate "$m" 3); b=$(rate "$m" 4)
    [[ -n $r ]] || continue
    printf '%-12s %10s %8s %16s %16s\n' "$m" "$r" "$b" "$(ratio "$MM" "$r")" "$(ratio "$MB" "$b")"
done
if [[ -s $WORK/stats.json ]]; then
    echo "mover's own stats: $(cat "$WORK/stats.json")"
    "$PY" - "$WORK/stats.json" <<'PY'
import json, os, sys
s = json.load(open(sys.argv[1]))
if s.get("rerun_s") is not None and s.get("first_s"):
    print(f"re-run / first run time: {s['rerun_s'] / s['first_s']:.3f} "
          f"({s['rerun_s']:.3f} s / {s['first_s']:.2f} s, re-run copied {s['rerun_copied']}, "
          f"logins saved {s.get('rerun_logins_saved')})")
cold = sys.argv[1] + ".cold"
if os.path.exists(cold) and s.get("first_s"):
    c = json.load(open(cold))
    t0, t1 = (float(x) for x in open(sys.argv[1] + ".coldwall").read().split())
    print(f"cold re-run (new process): passes {c['first_s']:.3f} s = "
          f"{c['first_s'] / s['first_s']:.3f} of the first run; whole process "
          f"{t1 - t0:.2f} s = {(t1 - t0) / s['first_s']:.3f} (copied {c['copied']}, "
          f"verified {c['verified']}, targets read {c.get('targets_read')})")
floor = sys.argv[1] + ".floor"
if os.path.exists(floor) and s.get("first_s"):
    for text in open(floor).read().strip().splitlines():  # both sides, then source only
        seconds = float(text.split()[2])
        print(f"{text}: the server's floor for such a pass = {seconds / s['first_s']:.3f} "
              f"of the first run")
PY
fi

if [[ ${MEM_CHECK:-0} == 1 ]]; then
    echo
    echo "== memory: one mailbox of 10 000 messages, mover only"
    run_harness "$WORK/mem.txt" "$WORK/mem.json" 1 10000 "" >/dev/null
    echo "mover (1 x 10000): $(awk '$1 == "mover" {print $3 " msgs/s, " $7}' "$WORK/mem.txt")," \
        "stats $(cat "$WORK/mem.json" 2>/dev/null || echo '{}')"
fi

echo "mover/mbsync-4 ratio: $(ratio "$MM" "$(rate mbsync-par 3)")"
