"""Private Postfix + Dovecot instances for tests: real servers, nothing of the machine's own.

Why a harness of its own: the `postfix-dovecot` driver administers a real mail system, and
the only honest test of it is a real Postfix in front of a real Dovecot. Each `MailHost`
writes a complete, self-contained configuration under its own folder (a `mktemp -d` made
0755 so that the `postfix`, `dovecot` and `dovenull` users can traverse it), listens only on
127.0.0.1 high ports, and never reads or writes /etc/postfix or /etc/dovecot. Both servers
run in the foreground as our children (Postfix's `master -d`, Dovecot's `-F`), so each one
is stopped by its PID, never by name, and a crashed test cannot leave a daemonised server
behind in another process group.

What this harness writes is the *admin's* part of the configuration: listeners, queue
folders, the Dovecot userdb/passdb pointing at the driver's passwd-file, a master user for
IMAP. The routing parameters that make the shared domains work (virtual alias and mailbox
maps, relayhost = fed) are *not* written here: the driver sets them itself (`postconf -e`)
and checks them, which is what the tests must prove.

Lessons from `../shared/notes/postfix-dovecot-pitfalls.md` applied here: `myhostname` per
instance, no DNS, `alias_maps` empty, `maillog_file` with its prefix and `postlog` service,
`smtpd_forbid_bare_newline`, `first_valid_uid` for the mail user, `ssl = no` with
`disable_plaintext_auth = no` on loopback, waiting for an empty queue before a stop.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.processes import stop_process
from sysutil import free_port

MASTER = "/usr/lib/postfix/sbin/master"
MAIL_USER = os.environ.get("MAILFERRY_TEST_MAIL_USER", "vmail")
MASTER_USER = "mailferry"


def missing_prerequisites() -> str | None:
    """Why real-server tests cannot run here, or None."""
    for tool in ("postfix", "postconf", "postmap", "dovecot", "doveadm"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run ./bootstrap.sh test as root)"
    if not Path(MASTER).exists():
        return f"{MASTER} missing"
    if os.geteuid() != 0:
        return "Postfix's and Dovecot's masters must start as root"
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        return f"system user {MAIL_USER} missing (./bootstrap.sh test creates it)"
    if not Path("/usr/lib/dovecot/lmtp").exists():
        return "dovecot-lmtpd not installed"
    return None


class PortTaken(RuntimeError):
    """A server's port answered, but not from the server: someone else bound it first."""


def listens_in(pid: int, port: int) -> bool:
    """Whether process `pid` or a process it started holds the socket listening on TCP
    `port` (in its own network namespace: /proc/PID/net)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for member in _tree(pid):
        try:
            fds = os.listdir(f"/proc/{member}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{member}/fd/{fd}") in inodes:
                    return True
    return False


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (a wrapper such as `ip netns exec` execs, but a
    server may hand its listener to a child)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def wait_port(port: int, timeout: float = 15.0, address: str = "127.0.0.1") -> bool:
    """True once something accepts on address:port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


MASTER_CF = """\
{address}:{smtp} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
lmtp       unix  - - n -     - lmtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
tlsmgr     unix  - - n 1000? 1 tlsmgr
"""

MAIN_CF = """\
# generated by tests/pfdovecot.py: private instance {name}; the driver adds its routing
compatibility_level = 3.6
queue_directory = {root}/postfix/spool
data_directory = {root}/postfix/data
maillog_file = {root}/postfix/maillog
maillog_file_prefixes = {root}
myhostname = {name}.mail.invalid
mydomain = {name}.mail.invalid
myorigin = $myhostname
inet_interfaces = {address}
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = {networks}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtpd_forbid_bare_newline = yes
recipient_delimiter =
# short retries: a test must not wait Postfix's default 300 s after fed was briefly away
minimal_backoff_time = 1s
maximal_backoff_time = 5s
queue_run_delay = 1s
"""

DOVECOT_CONF = """\
# generated by tests/pfdovecot.py: private instance {name}
instance_name = mailferry-{name}
base_dir = {root}/dovecot/run
state_dir = {root}/dovecot/state
protocols = imap lmtp
listen = {address}
log_path = {root}/dovecot/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# mailferry's mailbox ids are local=domain: '=' must be a username character
auth_username_chars = abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@=
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 100
namespace inbox {{
  inbox = yes
  separator = /
}}
# The master user (SASL PLAIN with an authorization identity) reads every mailbox.
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN username_format=%u {root}/dovecot/master-users
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {state}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {state}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = {address}
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {address}
    port = {lmtp}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
"""

TLS_MAIN_CF = """\
# TLS required on every hop (tests/pfdovecot.py MailHost.tls)
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = encrypt
smtpd_tls_loglevel = 1
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca}
smtp_tls_loglevel = 1
lmtp_tls_security_level = encrypt
lmtp_tls_CAfile = {ca}
lmtp_tls_loglevel = 1
"""


@dataclass
class MailHost:
    """One Postfix + Dovecot system on 127.0.0.1 (or `address`), configured under `root`.

    `wrap` prefixes the servers' commands (``ip netns exec NS``: a host in a network
    namespace, `tests/netns.py`); `networks` is Postfix's mynetworks (who may relay)."""

    name: str
    root: Path
    fed_port: int
    domains: tuple[str, ...] = ("corp.example",)
    smtp_port: int = field(default_factory=free_port)
    lmtp_port: int = field(default_factory=free_port)
    imap_port: int = field(default_factory=free_port)
    master_password: str = "master-secret"
    postfix: subprocess.Popen[bytes] | None = None
    dovecot: subprocess.Popen[bytes] | None = None
    address: str = "127.0.0.1"
    wrap: tuple[str, ...] = ()
    networks: str = "127.0.0.0/8"
    # (certificate, key, CA): TLS required on every hop of this host -- smtpd takes mail only
    # after STARTTLS, Postfix relays to fed and hands to Dovecot LMTP only over verified TLS,
    # Dovecot logs no one in without it (a host elsewhere on the network, tests/netns.py).
    tls: tuple[Path, Path, Path] | None = None

    @property
    def postfix_dir(self) -> Path:
        return self.root / "postfix" / "etc"

    @property
    def dovecot_conf(self) -> Path:
        return self.root / "dovecot" / "dovecot.conf"

    @property
    def state_dir(self) -> Path:
        return self.root / "mailferry"

    @property
    def password_file(self) -> Path:
        return self.root / "master.password"

    def write_config(self) -> None:
        """Every file the admin would write; the driver's tables start empty."""
        user = pwd.getpwnam(MAIL_USER)
        for sub in ("postfix/etc", "postfix/spool", "dovecot/run", "dovecot/state", "mail",
                    "mailferry"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for path in (self.root, self.root / "postfix", self.root / "dovecot"):
            path.chmod(0o755)
        shutil.chown(self.root / "postfix" / "spool", "root", "root")
        (self.root / "postfix" / "data").mkdir(exist_ok=True)
        shutil.chown(self.root / "postfix" / "data", "postfix", "postfix")
        os.chown(self.root / "mail", user.pw_uid, user.pw_gid)
        values = {"name": self.name, "root": self.root, "smtp": self.smtp_port,
                  "lmtp": self.lmtp_port, "imap": self.imap_port, "uid": user.pw_uid,
                  "state": self.state_dir, "address": self.address,
                  "networks": self.networks}
        main_cf, dovecot_conf = MAIN_CF.format(**values), DOVECOT_CONF.format(**values)
        if self.tls is not None:
            cert, key, ca = self.tls
            main_cf += TLS_MAIN_CF.format(cert=cert, key=key, ca=ca)
            dovecot_conf = dovecot_conf.replace(
                "ssl = no\ndisable_plaintext_auth = no\n",
                f"ssl = required\nssl_cert = <{cert}\nssl_key = <{key}\n"
                "ssl_min_protocol = TLSv1.2\ndisable_plaintext_auth = yes\n")
        (self.postfix_dir / "main.cf").write_text(main_cf)
        (self.postfix_dir / "master.cf").write_text(MASTER_CF.format(**values))
        self.dovecot_conf.write_text(dovecot_conf)
        master_users = self.root / "dovecot" / "master-users"
        master_users.write_text(f"{MASTER_USER}:{{PLAIN}}{self.master_password}\n")
        master_users.chmod(0o644)
        passwd = self.state_dir / "passwd"
        if not passwd.exists():
            passwd.write_text("")
        self.password_file.write_text(self.master_password + "\n")
        self.password_file.chmod(0o600)

    # -- servers ------------------------------------------------------------------------
    def start(self) -> None:
        """Write the configuration and start both servers (Dovecot first: Postfix's LMTP).

        Ports are drawn at random (`free_port`), so a parallel test may take one between
        the draw and the server's bind: the server then exits on "address in use" while
        the other's listener answers the wait. A port whose listener is not the server's
        gets new ports and a new start (bounded), as tests/world.py does for its servers;
        so does a server that exited on "Address already in use" (a port taken as it
        bound, or drawn twice: each draw is free when drawn, and none is bound yet)."""
        for attempt in range(3):
            self.write_config()
            try:
                self.start_dovecot()
                self.start_postfix()
                return
            except PortTaken:
                self.stop_postfix()
                self.stop_dovecot()
                if attempt == 2:
                    raise
                self.smtp_port, self.lmtp_port, self.imap_port = (
                    free_port(), free_port(), free_port())

    def start_dovecot(self) -> None:
        log = open(self.root / "dovecot" / "stderr.log", "ab")  # noqa: SIM115
        with log:
            self.dovecot = subprocess.Popen([*self.wrap, "dovecot", "-F", "-c",
                                             str(self.dovecot_conf)],
                                            stdout=log, stderr=log, start_new_session=True)
        self._await_listening("dovecot", self.dovecot, (self.imap_port, self.lmtp_port),
                              (self.root / "dovecot" / "stderr.log",
                               self.root / "dovecot" / "dovecot.log"))

    def start_postfix(self) -> None:
        wrap = "".join(f"{part} " for part in self.wrap)
        check = subprocess.run(["script", "-qc", f"{wrap}postfix -c {self.postfix_dir} check",
                                "/dev/null"], capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"{self.name}: postfix check failed: {check.stdout}")
        log = open(self.root / "postfix" / "stderr.log", "ab")  # noqa: SIM115
        with log:
            self.postfix = subprocess.Popen([*self.wrap, MASTER, "-c", str(self.postfix_dir),
                                             "-d"],
                                            stdout=log, stderr=log, start_new_session=True)
        self._await_listening("postfix", self.postfix, (self.smtp_port,),
                              (self.root / "postfix" / "stderr.log",
                               self.root / "postfix" / "maillog"))

    def _await_listening(self, server: str, proc: subprocess.Popen[bytes],
                         ports: tuple[int, ...], logs: tuple[Path, ...]) -> None:
        """Wait (bounded: 30 s, less if it exits) until `proc` accepts on every port; else
        fail with the tails of its logs in the message, since the folder holding them is
        gone by the time a CI run's output is read."""
        deadline = time.monotonic() + 30
        waiting = list(ports)
        while waiting and proc.poll() is None and time.monotonic() < deadline:
            if wait_port(waiting[0], timeout=0.5, address=self.address):
                waiting.pop(0)
        if not waiting:
            foreign = [p for p in ports if not listens_in(proc.pid, p)]
            if foreign:
                raise PortTaken(f"{self.name}: {server}: port(s) {foreign} answered by "
                                "another process")
            return
        tails = []
        for log in logs:
            try:
                lines = log.read_text(errors="replace").splitlines()[-8:]
            except OSError:
                continue
            tails.append(f"--- {log.name}:\n" + "\n".join(lines))
        state = "running" if proc.poll() is None else f"exited {proc.returncode}"
        failed = (PortTaken if proc.poll() is not None
                  and any("Address already in use" in tail for tail in tails) else RuntimeError)
        raise failed(f"{self.name}: {server} ({state}) did not listen on "
                     f"{self.address}:{waiting}; see {logs[0].parent}\n" + "\n".join(tails))

    def stop_dovecot(self) -> None:
        stop_process(self.dovecot)
        self.dovecot = None

    def stop_postfix(self) -> None:
        stop_process(self.postfix)
        self.postfix = None

    def stop(self) -> None:
        """Wait (bounded) for an empty queue, then stop both by PID."""
        if self.postfix is not None:
            self.wait_queue_empty(10)
        self.stop_postfix()
        self.stop_dovecot()

    def queue_files(self) -> int:
        spool = self.root / "postfix" / "spool"
        return sum(1 for sub in ("incoming", "active", "deferred", "hold", "maildrop")
                   for p in (spool / sub).rglob("*") if p.is_file())

    def wait_queue_empty(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue_files() == 0:
                return True
            time.sleep(0.1)
        return False

    def queue_report(self) -> str:
        """What is still queued, and the maillog's lines for it: the message of a failed wait.

        A CI run that only printed ``False`` for a queue that did not empty gave nothing to go
        on; this names each queued file's folder and what Postfix logged for its queue id.
        """
        spool = self.root / "postfix" / "spool"
        queued = [p for sub in ("incoming", "active", "deferred", "hold", "maildrop")
                  for p in (spool / sub).rglob("*") if p.is_file()]
        log = self.maillog().splitlines()
        lines = [f"{self.name}: {len(queued)} queued"]
        for path in queued:
            lines.append(f"  {path.relative_to(spool)}")
            lines.extend(f"    {line}" for line in log if f" {path.name}:" in line)
        return "\n".join(lines)

    def assert_queue_empty(self, timeout: float = 20.0) -> None:
        assert self.wait_queue_empty(timeout), self.queue_report()

    # -- what a test reads back -----------------------------------------------------------
    def doveadm(self, *args: str) -> str:
        result = subprocess.run(["doveadm", "-c", str(self.dovecot_conf), *args],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {args}: {result.stderr.strip()}")
        return result.stdout

    def user_of(self, mailbox_id: str) -> str:
        """Dovecot's user name of a mailbox (a host that names them otherwise overrides it)."""
        return mailbox_id

    def message_ids(self, mailbox_id: str) -> Counter[str]:
        """Message-ID -> copies over every folder, read by doveadm from the real Maildir."""
        user = self.user_of(mailbox_id)
        if f"{user}:" not in (self.state_dir / "passwd").read_text():
            return Counter()
        out = self.doveadm("fetch", "-u", user, "hdr.message-id", "mailbox", "*")
        found: Counter[str] = Counter()
        for line in out.splitlines():
            line = line.strip()
            if line.lower().startswith("hdr.message-id:"):
                line = line.split(":", 1)[1].strip()
            if line.startswith("<"):
                found[line] += 1
        return found

    def maillog(self) -> str:
        path = self.root / "postfix" / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def spec_document(self) -> dict[str, Any]:
        """The MailSystem document describing this host (credentials by reference)."""
        return {
            "apiVersion": "mailferry/v1", "kind": "MailSystem", "metadata": {"name": self.name},
            "spec": {"driver": "postfix-dovecot", "domains": list(self.domains),
                     "postfixDovecot": {
                         "stateDir": str(self.state_dir),
                         "postfixConfigDir": str(self.postfix_dir),
                         "dovecotConfig": str(self.dovecot_conf),
                         "mailRoot": str(self.root / "mail"),
                         "mailUser": MAIL_USER,
                         "smtp": f"{self.address}:{self.smtp_port}",
                         "lmtp": f"{self.address}:{self.lmtp_port}",
                         "imap": f"{self.address}:{self.imap_port}",
                         "masterUser": {"user": MASTER_USER,
                                        "password": {"file": str(self.password_file)}}}}}


def make_root(prefix: str) -> Path:
    """A fresh folder under /tmp that the servers' users can traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root
