"""A private Dovecot IMAP server for tests: own config, own port, own mail, stopped by PID.

Why real Dovecot: the mover's claims (pipelining, MULTIAPPEND, APPENDUID, UIDVALIDITY,
modified UTF-7 names, master-user logins) are about what a real server does; a fake would
only agree with our own reading of the RFCs. Setup follows ../shared/bench/imap_copy.sh and
../shared/notes/postfix-dovecot-pitfalls.md: separate base_dir/state_dir/instance_name,
a passwd-file userdb (so `doveadm -A` works), a system user `vmail` owning every Maildir
level, first_valid_uid set to it. Nothing in /etc/dovecot or the system's instance is used.

Needs root (Dovecot's master starts as root) and the `dovecot` binary (bootstrap.sh
installs dovecot-imapd for the tests); without them the tests that use it are skipped.
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
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from sysutil import free_port

MAIL_USER = "vmail"


def available() -> str | None:
    """Why a private Dovecot cannot run here, or None."""
    if os.geteuid() != 0:
        return "private Dovecot needs root"
    if not shutil.which("dovecot") or not shutil.which("doveadm"):
        return "dovecot not installed (bootstrap.sh test installs dovecot-imapd)"
    return None


def skip_unless_available() -> None:
    """Skip the calling test when Dovecot cannot run (outside CI's root machine)."""
    reason = available()
    if reason:
        pytest.skip(reason)


def _mail_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        nologin = shutil.which("nologin") or "/bin/false"
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                        nologin, MAIL_USER], check=True, timeout=30)
        entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def private_root() -> Path:
    """A fresh 0755 folder for instances: not under pytest's tmp_path, whose root is 0700,
    since Dovecot's unprivileged processes must traverse every level up to the mail."""
    root = Path(tempfile.mkdtemp(prefix="mfty-dovecot-"))
    root.chmod(0o755)
    return root


class Dovecot:
    """One private instance; `users` maps user -> password; `master` adds a master user."""

    def __init__(self, root: Path, name: str, users: dict[str, str], *,
                 master: tuple[str, str] | None = None, separator: str = "/",
                 prefix: str = "", tls: tuple[Path, Path] | None = None,
                 oauth2: tuple[str, str, str] | None = None, performance: bool = False) -> None:
        self.dir = root / name
        self.name = name
        self.users = dict(users)
        self.master = master
        self.separator = separator
        self.prefix = prefix
        self.tls = tls  # (certificate, key) PEM files: offer STARTTLS with them
        # (introspection URL, client id, client secret): XOAUTH2 and OAUTHBEARER logins,
        # tokens checked at that RFC 7662 endpoint (Dovecot's passdb oauth2)
        self.oauth2 = oauth2
        # Dovecot's high-performance login mode and imap process reuse, as a provider
        # serving thousands of logins runs it (the default starts an imap-login and an imap
        # process per connection): for the benchmarks whose source plays a provider.
        self.performance = performance
        self.port = free_port()
        self.uid, self.gid = _mail_ids()
        self.conf = self.dir / "dovecot.conf"

    def write(self) -> None:
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d.parent, 0o755)
        os.chmod(d, 0o755)
        os.chown(d / "mail", self.uid, self.gid)
        (d / "users").write_text("".join(
            f"{u}:{{PLAIN}}{p}:{self.uid}:{self.gid}::{d / 'mail' / u}::\n"
            for u, p in self.users.items()))
        (d / "users").chmod(0o644)
        master = ""
        if self.master:
            (d / "masters").write_text(f"{self.master[0]}:{{PLAIN}}{self.master[1]}\n")
            (d / "masters").chmod(0o644)
            master = (f"passdb {{\n  driver = passwd-file\n  master = yes\n"
                      f"  args = scheme=PLAIN {d / 'masters'}\n  pass = yes\n}}\n")
        self.conf.write_text(f"""# private test instance {self.name}
instance_name = mfty-{self.name}-{self.port}
base_dir = {d / 'run'}
state_dir = {d / 'state'}
protocols = imap
listen = 127.0.0.1
log_path = {d / 'dovecot.log'}
{self._ssl()}
disable_plaintext_auth = no
{self._auth()}
first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 100
namespace inbox {{
  inbox = yes
  separator = {self.separator}
  prefix = {self.prefix}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox "Sent Messages" {{
    special_use = \\Sent
  }}
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
}}
{master}{self._oauth2_passdb()}passdb {{
  driver = passwd-file
{"  mechanisms = plain login" if self.oauth2 else ""}
  args = scheme=PLAIN username_format=%u {d / 'users'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d / 'users'}
}}
service imap-login {{
{self._login_mode()}  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{self._imap_mode()}""")

    def _login_mode(self) -> str:
        if not self.performance:
            return ""
        return "  service_count = 0\n  process_min_avail = 2\n  vsz_limit = 1G\n"

    def _imap_mode(self) -> str:
        if not self.performance:
            return ""
        # auth's clients: each reused imap process counts (doveconf warns at the default)
        return ("service imap {\n  service_count = 100\n  process_min_avail = 4\n}\n"
                "service auth {\n  client_limit = 2000\n}\n")

    def _auth(self) -> str:
        if self.oauth2 is None:
            return "auth_mechanisms = plain login"
        # No failure delay and no per-IP penalty: a refused token is a step of the tests,
        # not an attack, and must not slow the next login.
        # (The penalty is anvil's: Dovecot's documented way off is its socket's mode 0.)
        return ("auth_mechanisms = plain login xoauth2 oauthbearer\nauth_failure_delay = 0\n"
                "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}")

    def _oauth2_passdb(self) -> str:
        """Dovecot 2.3's passdb oauth2: every token POSTed (introspection_mode = post) to
        the introspection endpoint with the client's credentials in the URL; the answer's
        `username` must be the login's user and `active` true."""
        if self.oauth2 is None:
            return ""
        url, client, secret = self.oauth2
        scheme, _, rest = url.partition("://")
        conf = self.dir / "oauth2.conf.ext"
        conf.write_text(f"introspection_mode = post\n"
                        f"introspection_url = {scheme}://{client}:{secret}@{rest}\n"
                        f"username_attribute = username\nactive_attribute = active\n"
                        f"active_value = true\ntimeout_msecs = 10000\n")
        conf.chmod(0o600)
        return (f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {conf}\n}}\n")

    def _ssl(self) -> str:
        if self.tls is None:
            return "ssl = no"
        cert, key = self.tls
        return f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"

    def start(self) -> Dovecot:
        """Write the config, start the master, wait until the port answers (bounded)."""
        self.write()
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"dovecot {self.name} not listening; see {self.dir}/dovecot.log")

    def pid(self) -> int | None:
        try:
            return int((self.dir / "run" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """TERM the master by its PID file, wait up to 10 s, then KILL."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def doveadm(self, *args: str) -> str:
        """Run doveadm against this instance; its stdout."""
        done = subprocess.run(["doveadm", "-c", str(self.conf), *args], check=True,
                              capture_output=True, text=True, timeout=60)
        return done.stdout

    def add_user(self, user: str, password: str) -> None:
        """Add a user (the passwd-file is re-read on each login)."""
        self.users[user] = password
        self.write()


class DovecotPair:
    """A source and a target Dovecot in one private root, each with every user of `users`
    (password ``pw-USER``) from the start: Dovecot's auth process may not notice a
    passwd-file rewritten within the same second."""

    def __init__(self, users: Iterable[str]) -> None:
        self.root = private_root()
        passwords = {u: f"pw-{u}" for u in users}
        self.src = Dovecot(self.root, "src", passwords).start()
        self.dst = Dovecot(self.root, "dst", passwords).start()

    def stop(self) -> None:
        self.src.stop()
        self.dst.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def serve_pair(users: Iterable[str]) -> Iterator[DovecotPair]:
    """A module fixture's body (``yield from serve_pair(USERS)``): skips without Dovecot,
    stops both servers after the module."""
    skip_unless_available()
    pair = DovecotPair(users)
    yield pair
    pair.stop()
