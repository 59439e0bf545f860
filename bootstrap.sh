#!/usr/bin/env bash
# Set up everything mailferry needs on a fresh Debian machine, then run one thing:
#   ./bootstrap.sh demo    install, then `reconcile demo` (20 mailboxes moved with mail flowing)
#   ./bootstrap.sh test    install, then the whole test suite (ruff, mypy, pytest)
# Idempotent: a second run only re-checks. Needs root (or sudo) only for missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")"

what="${1:-demo}"
case "$what" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 64 ;; esac

# Debian packages: Python with venv, and git (specs provenance, the demo's spec repository).
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The tests run private Postfix + Dovecot instances (tests/pfdovecot.py): install the servers
# without letting the packages configure or start the machine's own instances (debconf "No
# configuration" for Postfix; a temporary policy-rc.d refuses every service start), and a
# system user owning the test Maildirs. Nothing in /etc/postfix or /etc/dovecot is used.
if [ "$what" = test ]; then
  mail=()
  for pkg in postfix dovecot-imapd dovecot-lmtpd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || mail+=("$pkg")
  done
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ "${#mail[@]}" -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${mail[*]} (services not started)"
    echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
      $sudo chmod 755 /usr/sbin/policy-rc.d
      own_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${mail[@]}" >/dev/null
    [ -z "$own_policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
    # and not at the next boot either (the tests never use the system's instances)
    if [ -d /run/systemd/system ]; then
      $sudo systemctl disable --now postfix dovecot >/dev/null 2>&1 || true
    fi
  fi
  id vmail >/dev/null 2>&1 || $sudo useradd --system --user-group --no-create-home \
    --shell /usr/sbin/nologin vmail
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
