"""The mover's IMAP client with STARTTLS, against real Dovecots: one with a self-signed
certificate that offers STARTTLS, one in cleartext that does not."""

from __future__ import annotations

import imaplib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.drivers.base import ImapAccount
from reconciler.drivers.imap import ImapDriver
from reconciler.errors import TemporaryError
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport
from reconciler.mover.runner import Job, run_jobs
from reconciler.spec.model import Endpoint as SpecEndpoint
from reconciler.spec.model import ImapOptions, SecretRef
from reconciler.state.store import Store, default_url

from dovecot import Dovecot, skip_unless_available

USERS = {"tina": "pw-tina", "otto": "pw-otto"}


@dataclass
class Servers:
    tls: Dovecot  # offers STARTTLS with a self-signed certificate for 127.0.0.1
    plain: Dovecot  # ssl = no: no STARTTLS
    cert: Path
    root: Path


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    skip_unless_available()
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    root = Path(tempfile.mkdtemp(prefix="mfty-tls-"))
    root.chmod(0o755)
    cert, key = self_signed(root)
    tls = Dovecot(root, "tls", USERS, tls=(cert, key)).start()
    plain = Dovecot(root, "plain", USERS).start()
    yield Servers(tls, plain, cert, root)
    tls.stop()
    plain.stop()
    shutil.rmtree(root, ignore_errors=True)


def fill(server: Dovecot, user: str, count: int) -> None:
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=15)
    conn.login(user, USERS[user])
    for i in range(count):
        data = f"From: a@x\r\nMessage-ID: <{i}@tls>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
        assert conn.append("INBOX", None, None, data.encode())[0] == "OK"
    conn.logout()


def bodies(server: Dovecot, user: str) -> list[bytes]:
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=15)
    conn.login(user, USERS[user])
    conn.select("INBOX", readonly=True)
    _, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
    conn.logout()
    return sorted(item[1] for item in data if isinstance(item, tuple))


def login_lines(server: Dovecot, user: str) -> list[str]:
    time.sleep(0.3)  # Dovecot's log process writes asynchronously
    text = (server.dir / "dovecot.log").read_text(errors="replace")
    return [line for line in text.splitlines() if f"Login: user=<{user}>" in line]


def copy(src: ImapAccount, dst: ImapAccount, folder: Path) -> MailboxReport:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(Store(default_url(folder / "state.db")))
    job = Job(src.user, lambda: ImapEndpoint(src, readonly=True), lambda: ImapEndpoint(dst))
    return run_jobs([job], manifest=manifest, retries=1)[0]


def test_starttls_both_sides_copies_byte_identical_and_logs_in_over_tls(
        servers: Servers, tmp_path: Path) -> None:
    # tina's mail goes from the TLS server's tina to the TLS server's otto: both over STARTTLS
    fill(servers.tls, "tina", 7)
    src = ImapAccount("127.0.0.1", servers.tls.port, "tina", "pw-tina", timeout=15,
                      tls="starttls", cafile=str(servers.cert))
    dst = ImapAccount("127.0.0.1", servers.tls.port, "otto", "pw-otto", timeout=15,
                      tls="starttls", cafile=str(servers.cert))
    report = copy(src, dst, tmp_path)
    assert report.verified and report.copied == 7, report.as_dict()
    assert bodies(servers.tls, "otto") == bodies(servers.tls, "tina")
    lines = login_lines(servers.tls, "otto")
    # the mover's login (imaplib's, in cleartext, are the test's own reads)
    assert any(", TLS," in line or line.rstrip().endswith(", TLS") for line in lines), lines


def test_starttls_required_but_not_offered_sends_no_login(
        servers: Servers, tmp_path: Path) -> None:
    fill(servers.plain, "tina", 2)
    before = len(login_lines(servers.plain, "otto"))
    src = ImapAccount("127.0.0.1", servers.plain.port, "tina", "pw-tina", timeout=15)
    dst = ImapAccount("127.0.0.1", servers.plain.port, "otto", "pw-otto", timeout=15,
                      tls="starttls")
    report = copy(src, dst, tmp_path)
    assert not report.verified and report.copied == 0 and report.attempts == 1
    assert report.error is not None
    assert f"127.0.0.1:{servers.plain.port}" in report.error
    assert "does not offer STARTTLS" in report.error and "cleartext" in report.error
    assert len(login_lines(servers.plain, "otto")) == before  # the password never left
    assert bodies(servers.plain, "otto") == []


def test_starttls_with_an_untrusted_certificate_is_refused(
        servers: Servers, tmp_path: Path) -> None:
    # no cafile: the self-signed certificate is not in the system's roots
    src = ImapAccount("127.0.0.1", servers.tls.port, "tina", "pw-tina", timeout=15,
                      tls="starttls")
    dst = ImapAccount("127.0.0.1", servers.plain.port, "otto", "pw-otto", timeout=15)
    report = copy(src, dst, tmp_path)
    assert not report.verified and report.attempts == 1 and report.error is not None
    assert f"127.0.0.1:{servers.tls.port}" in report.error
    assert "certificate" in report.error.lower()


def test_command_line_starttls_source(servers: Servers, tmp_path: Path) -> None:
    import sys

    fill(servers.tls, "otto", 3)
    users = tmp_path / "users.txt"
    users.write_text("otto pw-otto\n")
    cmd = [sys.executable, "-m", "reconciler.mover", "copy",
           "--src", f"127.0.0.1:{servers.tls.port}", "--src-tls", "starttls",
           "--src-cafile", str(servers.cert), "--dst", f"127.0.0.1:{servers.plain.port}",
           "--users", str(users), "--state", str(tmp_path / "s.db"), "--progress", "none"]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert bodies(servers.plain, "otto") == bodies(servers.tls, "otto")
    assert len(bodies(servers.plain, "otto")) >= 3


def test_imap_driver_trusts_a_private_ca_only_through_its_ca_file(
        servers: Servers, tmp_path: Path) -> None:
    """The drivers' `caFile` / `imapCaFile`: the engine's copies, logins and ping of a
    server with a private certificate work with it and fail, naming STARTTLS, without it."""
    passwords = tmp_path / "passwords"
    passwords.write_text("tina@corp.example pw-tina\n")

    def driver(name: str, cafile: str | None) -> ImapDriver:
        return ImapDriver(name, ImapOptions(
            server=SpecEndpoint("127.0.0.1", servers.tls.port), state_dir=str(tmp_path / name),
            tls="starttls", cafile=cafile, login="per-user",
            passwords=SecretRef(file=str(passwords)), login_format="{local}"))

    trusted = driver("trusted", str(servers.cert))
    trusted.ping()
    assert "INBOX" in trusted.list_folders("tina=corp.example")
    assert trusted.imap_account("tina=corp.example").cafile == str(servers.cert)
    untrusted = driver("untrusted", None)
    with pytest.raises(TemporaryError, match=r"STARTTLS failed.*CERTIFICATE_VERIFY_FAILED"):
        untrusted.ping()
    with pytest.raises(TemporaryError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.list_folders("tina=corp.example")
