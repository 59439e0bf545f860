#!/usr/bin/env bash
# Set up everything mailferry needs on a fresh Debian machine, then run one thing:
#   ./bootstrap.sh demo    install, then `reconcile demo` (20 mailboxes moved with mail flowing)
#   ./bootstrap.sh test    install, then the whole test suite (ruff, mypy, pytest)
# Idempotent: a second run only re-checks. Needs root (or sudo) only for missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")"

what="${1:-demo}"
case "$what" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 64 ;; esac

# Debian packages: Python with venv and git (specs provenance, the demo's spec repository).
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
# For the tests only: PostgreSQL (the state store on a private server) and Dovecot's IMAP
# server (the station agent's upload and switch test); each test starts private instances,
# the system's own services are never configured or run.
if [ "$what" = test ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v dovecot >/dev/null || need+=(dovecot-imapd)
fi
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing Debian packages: ${need[*]}"
  # Keep the packages' own services (a system PostgreSQL cluster...) from starting: the
  # tests run private instances and never touch the system's.
  blocker=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    blocker=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$blocker" >/dev/null
    $sudo chmod 755 "$blocker"
    trap '$sudo rm -f "$blocker"' EXIT
  fi
  $sudo apt-get update -qq
  # RUNLEVEL=1 as well: where policy-rc.d is already there, invoke-rc.d still starts nothing.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
  [ -z "$blocker" ] || $sudo rm -f "$blocker"
fi

python3 - <<'PY' || { echo "bootstrap: mailferry needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

if [ "$what" = demo ]; then
  exec .venv/bin/reconcile demo
fi
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q
