#!/usr/bin/env bash
# fed_ab.sh - two checkouts of fed, pair by pair, under bench/fed_profile.sh's load.
#
# On a shared machine the same code's rate moves 5-10 % between two runs minutes apart (once
# 40 %), so one run of A against one of B says nothing about a change worth less than that.
# This runs A and B in turn (A B A B ...), each with its own bench/fed_profile.sh, and
# prints every pair's rate and CPU a message, each pair's B/A ratios, and their medians:
# pairing keeps a ratio meaningful while the machine's speed drifts. Run an A/A first (the
# same folder twice) to see the machine's spread and the bias against the second of a pair.
#
# Usage (as root, like fed_profile.sh):  bench/fed_ab.sh A_DIR B_DIR [PAIRS] [C] [N]
#   bench/fed_ab.sh /work/main /work/branch 6 10 4000
#   FED_PROCESSES=2 bench/fed_ab.sh ...   (passed on to fed_profile.sh)
# A_DIR and B_DIR are checkouts with a .venv each (a symlink to one is enough).
set -euo pipefail
A=${1:?usage: fed_ab.sh A_DIR B_DIR [PAIRS] [C] [N]}
B=${2:?usage: fed_ab.sh A_DIR B_DIR [PAIRS] [C] [N]}
PAIRS=${3:-6}
C=${4:-10}
N=${5:-4000}
[ "$PAIRS" -ge 1 ] && [ "$PAIRS" -le 50 ] || { echo "PAIRS must be 1..50" >&2; exit 2; }

one() {  # one DIR -> "RATE CPU_MS" of one fed_profile.sh run
  local line
  line=$(cd "$1" && bench/fed_profile.sh "$C" "$N" 2>&1 | grep "messages/s accepted") || {
    echo "fed_profile.sh failed in $1" >&2; exit 1; }
  sed -E 's/.* ([0-9]+) messages\/s accepted, CPU per message ([0-9.]+) ms.*/\1 \2/' <<< "$line"
}

echo "pair  A msg/s  A ms  B msg/s  B ms  rate B/A  cpu B/A"
for i in $(seq "$PAIRS"); do
  read -r ar ac < <(one "$A")
  read -r br bc < <(one "$B")
  echo "$i $ar $ac $br $bc"
done | awk '
  function median(v, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  { rr[NR] = $4 / $2; cr[NR] = $5 / $3
    printf "%4d %8d %5.2f %8d %5.2f %9.3f %8.3f\n", $1, $2, $3, $4, $5, rr[NR], cr[NR] }
  END { printf "median B/A: rate %.3f, CPU a message %.3f (%d pairs)\n", median(rr, NR), median(cr, NR), NR }'
