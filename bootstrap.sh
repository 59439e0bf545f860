#!/usr/bin/env bash
# Set up everything mailferry needs on a fresh Debian machine, then run one thing:
#   ./bootstrap.sh demo    install, then `reconcile demo` (20 mailboxes moved with mail flowing)
#   ./bootstrap.sh test    install, then the whole test suite (ruff, mypy, lint-imports, the wheel as users
#                          install it: .ci/wheel-smoke.sh, pytest)
# Idempotent: a second run only re-checks. Needs root (or sudo) only for missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")"

what="${1:-demo}"
case "$what" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 64 ;; esac

# Debian packages. Always: Python with venv, and git (specs provenance, the demo's spec
# repository). For the tests: PostgreSQL (the state store on a private server), Postfix and
# Dovecot (private instances started by the tests: the Postfix + Dovecot driver, the station
# agent's IMAP upload), a C compiler (the power-loss test's recorder) and Thunderbird (run
# headless by the station agent's tests to make real profiles and to start on a switched
# one; it has no service). OpenSSH (client and server) and iproute2: the remote-host tests
# (tests/test_remote_hosts.py) put two mail hosts in network namespaces, each with a private
# sshd of its own config (the package's sshd service is never started). Only what is
# missing is installed, as root or through sudo, and the packages' own services are kept
# from starting: debconf "No configuration" for Postfix, a temporary policy-rc.d and
# RUNLEVEL=1 refuse every service start; nothing in /etc/postfix, /etc/dovecot, /etc/ssh or
# the system's PostgreSQL cluster is ever used. Chromium and its driver: the
# status page's tests load it in a real headless browser (tests/test_web_browser.py).
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
if [ "$what" = test ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  # postfix-sqlite, dovecot-sqlite: the adopted SQL layout of tests/test_adopt.py (sqlite: maps,
  # Dovecot's sql driver)
  for pkg in postfix dovecot-imapd dovecot-lmtpd postfix-sqlite dovecot-sqlite chromium \
             chromium-driver thunderbird openssh-client openssh-server iproute2 sudo; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need+=("$pkg")
  done
  # A C compiler: the power-loss test builds its LD_PRELOAD recorder (tests/powerloss/).
  command -v cc >/dev/null || need+=(gcc libc6-dev)
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ "${#need[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need[*]} (their services are not started)"
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  blocker=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    blocker=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$blocker" >/dev/null
    $sudo chmod 755 "$blocker"
    trap '$sudo rm -f "$blocker"' EXIT
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
  [ -z "$blocker" ] || $sudo rm -f "$blocker"
  if [ -d /run/systemd/system ]; then  # and not at the next boot either
    $sudo systemctl disable --now postfix dovecot ssh >/dev/null 2>&1 || true
  fi
fi
if [ "$what" = test ]; then
  # The owner of the private Dovecots' Maildirs, and the user the private Cyrus instances run
  # as (tests/cyrus.py): made here, before the suite, not by the first test that needs one --
  # a useradd replaces /etc/passwd, which detaches ip netns exec's per-file binds of it in
  # other workers' namespaces (tests/netns.py), and two workers' useradds race each other.
  for user in vmail cyrus; do
    id "$user" >/dev/null 2>&1 || $sudo useradd --system --user-group --no-create-home \
      --shell /usr/sbin/nologin "$user"
  done
fi

# Cyrus IMAP for the tests (tests/cyrus.py): Debian's cyrus-imapd conflicts with
# dovecot-imapd (both provide imap-server), so it is not installed but unpacked into
# $cyrus_root (apt-get download + dpkg -x: no maintainer scripts, no service, nothing in
# /etc); the shared libraries its binaries need are installed with apt (read from the
# packages' Depends), with saslpasswd2 (sasl2-bin) and the PLAIN mechanism for the private
# instances' own sasldb. Idempotent: skipped when the binaries are there.
cyrus_root=/opt/mailferry-cyrus
if [ "$what" = test ] && [ ! -x "$cyrus_root/usr/lib/cyrus/bin/imapd" ]; then
  echo "bootstrap: unpacking Cyrus IMAP into $cyrus_root (not installed: it conflicts with Dovecot)"
  $sudo apt-get update -qq
  mapfile -t cyrus_libs < <(apt-cache depends --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances cyrus-imapd cyrus-common \
    | awk '/Depends: lib/ {print $2}' | sort -u)
  cyrus_blocker=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # no service starts (saslauthd), as above
    cyrus_blocker=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$cyrus_blocker" >/dev/null
    $sudo chmod 755 "$cyrus_blocker"
    trap '$sudo rm -f "$cyrus_blocker"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends \
    "${cyrus_libs[@]}" sasl2-bin libsasl2-modules >/dev/null
  [ -z "$cyrus_blocker" ] || $sudo rm -f "$cyrus_blocker"
  if [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now saslauthd >/dev/null 2>&1 || true
  fi
  debs=$(mktemp -d)
  chmod 777 "$debs"  # apt's _apt user downloads into it
  (cd "$debs" && $sudo apt-get download -qq cyrus-imapd cyrus-common)
  $sudo mkdir -p "$cyrus_root.new"
  for deb in "$debs"/*.deb; do $sudo dpkg -x "$deb" "$cyrus_root.new"; done
  $sudo rm -rf "$cyrus_root" "$debs"
  $sudo mv "$cyrus_root.new" "$cyrus_root"
  if LD_LIBRARY_PATH="$cyrus_root/usr/lib/x86_64-linux-gnu" \
      ldd "$cyrus_root/usr/lib/cyrus/bin/imapd" | grep 'not found'; then
    echo "bootstrap: libraries of Cyrus missing (above)" >&2
    exit 1
  fi
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
.venv/bin/lint-imports --no-cache
.ci/wheel-smoke.sh .venv/bin/python
# Three workers, one test module each at a time (--dist loadfile: a module's servers stay in
# one process): the suite waits mostly on real servers, so on 2 cores it takes ~40 % of the
# serial time. Every fixture takes free ports, own temp folders and own namespaces.
exec .venv/bin/pytest -q -n 3 --dist loadfile
