"""A private Cyrus IMAP server for tests: own config, own port, own spool, stopped by PID.

Why real Cyrus: it is the server that showed the mover's proof was not one (issue 21). By
default it replaces 8-bit header bytes with 'X' when it stores a message (`munge8bit`),
answers a pipelined command behind AUTHENTICATE with BAD, uses '.' as its separator with
every folder under `INBOX.`, and logs admins in on behalf of a user (SASL authorization
id). A fake would only agree with our own reading of its documentation.

How it runs next to Dovecot: Debian's cyrus-imapd and dovecot-imapd conflict (both provide
imap-server), so Cyrus is not installed but unpacked (`apt-get download cyrus-imapd
cyrus-common` + `dpkg -x`, done by bootstrap.sh) into CYRUS_ROOT, its shared libraries
found with LD_LIBRARY_PATH, its libraries' own dependencies installed with apt. Nothing
in /etc/imapd.conf, /etc/cyrus.conf or /var/lib/cyrus is used: every path of the
instance is in its own folder. The master runs in the foreground (no -d), started with
Popen, so it is stopped by the PID we started; it drops root to the system user `cyrus`.
Passwords are in the instance's own sasldb (saslpasswd2 -f).

Needs root and the unpacked binaries; without them the tests that use it are skipped.
"""

from __future__ import annotations

import imaplib
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

from sysutil import free_port

CYRUS_ROOT = Path(os.environ.get("MAILFERRY_CYRUS_ROOT", "/opt/mailferry-cyrus"))
BIN = CYRUS_ROOT / "usr/lib/cyrus/bin"
LIBS = CYRUS_ROOT / "usr/lib/x86_64-linux-gnu"
RUN_USER = "cyrus"
ADMIN = "cyrusadmin"


def available() -> str | None:
    """Why a private Cyrus cannot run here, or None."""
    if os.geteuid() != 0:
        return "private Cyrus needs root"
    if not (BIN / "master").exists() or not (BIN / "imapd").exists():
        return f"Cyrus not unpacked in {CYRUS_ROOT} (bootstrap.sh test does it)"
    if not shutil.which("saslpasswd2"):
        return "saslpasswd2 missing (bootstrap.sh test installs sasl2-bin)"
    return None


def skip_unless_available() -> None:
    """Skip the calling test when Cyrus cannot run."""
    reason = available()
    if reason:
        pytest.skip(reason)


def _run_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(RUN_USER)
    except KeyError:
        nologin = shutil.which("nologin") or "/bin/false"
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                        nologin, RUN_USER], check=True, timeout=30)
        entry = pwd.getpwnam(RUN_USER)
    return entry.pw_uid, entry.pw_gid


def private_root() -> Path:
    """A fresh 0755 folder for instances (Cyrus drops root: it must traverse every level)."""
    root = Path(tempfile.mkdtemp(prefix="mfty-cyrus-"))
    root.chmod(0o755)
    return root


class Cyrus:
    """One private instance; `users` maps user -> password; the admin `cyrusadmin` may log
    in on behalf of any user (authorization id). `munge8bit`: Cyrus's own default is yes."""

    def __init__(self, root: Path, name: str, users: dict[str, str], *,
                 admin_password: str = "adminpw", munge8bit: bool = True,
                 unixhierarchysep: bool = False) -> None:
        self.dir = root / name
        self.name = name
        self.users = dict(users)
        self.admin = (ADMIN, admin_password)
        self.munge8bit = munge8bit
        self.unixhierarchysep = unixhierarchysep
        self.separator = "/" if unixhierarchysep else "."
        self.port = free_port()
        self.lmtp_port = free_port()  # LMTP over TCP: where fed delivers for this system
        self.uid, self.gid = _run_ids()
        self.conf = self.dir / "imapd.conf"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(LIBS)}

    def write(self) -> None:
        d = self.dir
        for sub in ("conf", "conf/proc", "conf/lock", "conf/socket", "conf/log", "conf/db",
                    "conf/user", "conf/quota", "conf/sieve", "spool", "sieve"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d.parent, 0o755)
        os.chmod(d, 0o755)
        for path in [d / "conf", d / "spool", d / "sieve", *(d / "conf").iterdir()]:
            os.chown(path, self.uid, self.gid)
        self.conf.write_text(f"""# private test instance {self.name}
configdirectory: {d / 'conf'}
proc_path: {d / 'conf/proc'}
mboxname_lockpath: {d / 'conf/lock'}
defaultpartition: default
partition-default: {d / 'spool'}
sievedir: {d / 'sieve'}
lmtpsocket: {d / 'conf/socket/lmtp'}
idlesocket: {d / 'conf/socket/idle'}
notifysocket: {d / 'conf/socket/notify'}
altnamespace: no
unixhierarchysep: {'yes' if self.unixhierarchysep else 'no'}
munge8bit: {'yes' if self.munge8bit else 'no'}
admins: {ADMIN}
proxyservers: {ADMIN}
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {d / 'sasldb2'}
sasl_mech_list: PLAIN LOGIN
autocreate_quota: -1
umask: 077
lmtp_downcase_rcpt: yes
syslog_prefix: mfty-cyrus-{self.name}
""")
        lmtp = f"{BIN / 'lmtpd'} -a -C {self.conf}"
        (d / "cyrus.conf").write_text(f"""START {{
  recover cmd="{BIN / 'ctl_cyrusdb'} -C {self.conf} -r"
}}
SERVICES {{
  imap cmd="{BIN / 'imapd'} -C {self.conf}" listen="127.0.0.1:{self.port}" prefork=0 maxchild=100
  lmtp cmd="{lmtp}" listen="127.0.0.1:{self.lmtp_port}" prefork=0 maxchild=20
}}
EVENTS {{
}}
""")
        self._passwords()

    def _passwords(self) -> None:
        db = self.dir / "sasldb2"
        for user, password in {**self.users, self.admin[0]: self.admin[1]}.items():
            subprocess.run(["saslpasswd2", "-f", str(db), "-p", "-c", "-u", "", user],
                           input=password.encode(), check=True, timeout=30,
                           capture_output=True)
        os.chown(db, self.uid, self.gid)
        db.chmod(0o600)

    def start(self) -> Cyrus:
        """Write the config, start the master in the foreground, wait until the port
        answers (bounded), create every user's INBOX as the admin."""
        self.write()
        log = (self.dir / "master.log").open("ab")
        self.process = subprocess.Popen(
            [str(BIN / "master"), "-C", str(self.conf), "-M", str(self.dir / "cyrus.conf"),
             "-p", str(self.dir / "master.pid")],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # its own process group: on TERM the master signals its whole group, which
            # would otherwise be every other instance started by this test process
            start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cyrus {self.name} master exited "
                                   f"{self.process.returncode}; see {self.dir}/master.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"* OK"):
                        break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"cyrus {self.name} not listening; see {self.dir}/master.log")
        for user in self.users:
            self.create_user(user)
        return self

    def admin_login(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        imap.login(*self.admin)
        return imap

    def login(self, user: str) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        imap.login(user, self.users[user])
        return imap

    def create_user(self, user: str, password: str | None = None) -> None:
        """The user's password in the sasldb, and `user.NAME` (their INBOX) created."""
        if password is not None:
            self.users[user] = password
            self._passwords()
        imap = self.admin_login()
        try:
            typ, data = imap.create(f"user{self.separator}{user}")
            if typ != "OK" and b"exists" not in b" ".join(d or b"" for d in data).lower():
                raise RuntimeError(f"cyrus {self.name}: CREATE user.{user}: {typ} {data}")
        finally:
            imap.logout()

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        """TERM the master we started (by its PID), wait up to 10 s, then KILL."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def message_files(self, user: str) -> list[Path]:
        """The stored message files of a user's INBOX (Cyrus keeps one file per message,
        named `UID.`), for checking what was stored byte for byte."""
        return sorted((self.dir / "spool").rglob(f"user/{user}/[0-9]*."))
