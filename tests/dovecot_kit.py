"""A private Dovecot IMAP server on 127.0.0.1 for tests (this file holds no tests).

Why a real Dovecot. The agent's IMAP upload and login test must work against the server
users will really have (APPEND with flags and INTERNALDATE, CREATE of nested folders,
modified UTF-7 names, LOGIN refusals); a fake would only confirm our own reading of RFC 3501.

How (see shared notes on Dovecot pitfalls): its own config, base_dir, state_dir,
instance_name and log under a fresh 0755 temporary folder (login processes run as other
users and must traverse it); passwd-file passdb and userdb; mail owned by `nobody` (Dovecot
refuses uid 0) with first_valid_uid set to it; `ssl = no` with plaintext auth on loopback
only; stopped by the PID in its own pid file, never by name. Needs root and the
`dovecot-imapd` package (`bootstrap.sh` installs it); otherwise the tests using it skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

MAIL_USER = "nobody"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Dovecot:
    """One private Dovecot instance with password users."""

    def __init__(self, users: dict[str, str]) -> None:
        if os.geteuid() != 0 or shutil.which("dovecot") is None:
            pytest.skip("needs root and dovecot-imapd (./bootstrap.sh test installs it)")
        self.root = Path(tempfile.mkdtemp(prefix="mailferry-dovecot-"))
        os.chmod(self.root, 0o755)
        self.port = free_port()
        entry = pwd.getpwnam(MAIL_USER)
        uid, gid = entry.pw_uid, entry.pw_gid
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir()
        os.chown(self.root / "mail", uid, gid)
        lines = []
        for user, password in users.items():
            home = self.root / "mail" / user
            lines.append(f"{user}:{{PLAIN}}{password}:{uid}:{gid}::{home}::")
        (self.root / "users").write_text("\n".join(lines) + "\n")
        os.chmod(self.root / "users", 0o644)
        self.config = self.root / "dovecot.conf"
        self.config.write_text(f"""
instance_name = mailferry-test-{self.port}
base_dir = {self.root}/run
state_dir = {self.root}/state
protocols = imap
listen = 127.0.0.1
log_path = {self.root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.root}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
        subprocess.run(["dovecot", "-c", str(self.config)], check=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dovecot did not listen on {self.port}; see {self.root}")

    def stop(self) -> None:
        """TERM the master by its pid file, wait (bounded), KILL; remove the files."""
        pid_file = self.root / "run" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
