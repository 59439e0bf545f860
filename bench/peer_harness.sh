# peer_harness.sh - sourced by the bench scripts that drive ../shared/bench/postfix_relay.sh:
# sets HARNESS (the peer harness; env HARNESS wins) and PY (the checkout's interpreter).
# Needs REPO (the checkout). The shared benchmarks sit next to the main checkout
# (../shared); a worktree under wt/ finds them one level further up.
HARNESS=${HARNESS:-$REPO/../shared/bench/postfix_relay.sh}
[ -f "$HARNESS" ] || HARNESS=$REPO/../../shared/bench/postfix_relay.sh
[ -f "$HARNESS" ] || { echo "peer harness not found: $HARNESS" >&2; exit 1; }
PY=${PY:-$REPO/.venv/bin/python}
