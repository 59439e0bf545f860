#!/usr/bin/env bash
# mailferry as its users get it: build the sdist and the wheel (`python -m build`, the wheel
# made from the sdist, so both must carry the package data), install the wheel into a fresh
# virtual environment outside the checkout, and from an empty folder run `reconcile init`,
# `--plan` on the new repository (exit 2: three mailboxes to create; never a traceback)
# and `reconcile demo` (lost 0, duplicated 0). `./bootstrap.sh test` runs it.
#   usage: .ci/wheel-smoke.sh [PYTHON]   (PYTHON has `build`; default .venv/bin/python)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-$repo/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/mailferry-wheel-XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "wheel-smoke: FAIL: $*" >&2; exit 1; }

started=$(date +%s)
"$python" -m build -q --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log" >&2; fail "python -m build"; }
wheel=$(ls "$work"/dist/mailferry-*.whl)
echo "wheel-smoke: built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$wheel" >"$work/pip.log" 2>&1 \
  || { cat "$work/pip.log" >&2; fail "pip install of the wheel"; }
bin=$work/venv/bin
if ! ls "$work"/venv/lib/python3*/site-packages/mailferry/data/schemas/fedhub.schema.json \
    >/dev/null 2>&1; then
  fail "the wheel has no schemas"
fi
for part in reconciler/web/templates/overview.html reconciler/web/static/live.js; do
  ls "$work"/venv/lib/python3*/site-packages/$part >/dev/null 2>&1 \
    || fail "the wheel has no $part (the status page)"
done

mkdir "$work/empty" && cd "$work/empty"
"$bin/reconcile" --version
"$bin/fed" --version
"$bin/reconcile" init repo >"$work/init.log" || { cat "$work/init.log"; fail "reconcile init"; }
cd repo
set +e
"$bin/reconcile" --specs . --plan >"$work/plan.txt" 2>"$work/plan.err"
code=$?
set -e
cat "$work/plan.txt" "$work/plan.err"
if grep -q Traceback "$work/plan.err"; then fail "--plan printed a traceback"; fi
[ "$code" -eq 2 ] || fail "--plan on the new repository exited $code, not 2"
tail -n 1 "$work/plan.txt" | grep -q '^Plan: 3 mailboxes, 3 due now' || fail "unexpected plan"

cd "$work/empty"
"$bin/reconcile" demo >"$work/demo.txt" 2>&1 || { cat "$work/demo.txt"; fail "reconcile demo"; }
tail -n 4 "$work/demo.txt"
grep -qx 'lost: 0' "$work/demo.txt" && grep -qx 'duplicated: 0' "$work/demo.txt" \
  || fail "the demo lost or duplicated messages"
leftover=$(find "$work/empty" -mindepth 1 -maxdepth 1 ! -name repo)
[ -z "$leftover" ] || fail "the demo left files in the current folder: $leftover"
echo "wheel-smoke: ok in $(( $(date +%s) - started )) s"
