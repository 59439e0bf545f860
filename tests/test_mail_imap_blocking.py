"""The blocking IMAP session (`mailferry.mail.imap.blocking`) against a real Dovecot on
127.0.0.1, and the two callers that replaced `imaplib` with it: the drivers' data plane
(`imapstore`) and the station agent's upload (`imapupload`), including the upload's crash
case (an APPEND acknowledged by the server but not by the manifest).

Every message is checked independently with `imaplib` (not the code under test)."""

from __future__ import annotations

import hashlib
import imaplib
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.mail.imap import mutf7
from mailferry.mail.imap.blocking import BlockingImap
from mailferry.mail.imap.client import ImapCommandError, ImapConnectionError
from reconciler.drivers.imapstore import ImapLogin, imap_session
from reconciler.errors import TemporaryError
from station_agent import imapupload
from station_agent.localdata import LocalMessage, Manifest

from dovecot import Dovecot, private_root, skip_unless_available
from sysutil import free_port

pytestmark = pytest.mark.timeout(120)

USER, PASSWORD = "ann@corp.example", "ann-s3cret"
MASTER = ("admin", "admin-s3cret")
FOLDER = "Archives/\u00c9t\u00e9 & co \U0001f4e7"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    skip_unless_available()
    root = private_root()
    server = Dovecot(root, "blocking", {USER: PASSWORD, "bob@corp.example": PASSWORD},
                     master=MASTER).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _message(n: int) -> bytes:
    return (f"From: a@corp.example\r\nTo: {USER}\r\nSubject: m{n}\r\n"
            f"Message-ID: <m{n}@blocking.test>\r\n\r\nbody {n}\r\n").encode()


def _wire_contents(server: Dovecot, user: str, mailbox: str) -> list[tuple[bytes, bytes]]:
    """(flags, body) of every message, read with imaplib."""
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=30)
    try:
        conn.login(user, PASSWORD)
        typ, _ = conn.select('"' + mailbox + '"', readonly=True)
        if typ != "OK":
            return []
        typ, data = conn.fetch("1:*", "(FLAGS BODY.PEEK[])")
        return [(item[0], item[1]) for item in data if isinstance(item, tuple)]
    finally:
        conn.logout()


def test_a_session_appends_selects_fetches_and_survives_a_no(dovecot: Dovecot) -> None:
    wire = mutf7.encode(FOLDER.replace("/", dovecot.separator))
    with BlockingImap.connect("127.0.0.1", dovecot.port) as imap:
        assert imap.greeting.startswith(b"* OK")
        imap.login(USER, PASSWORD)
        imap.command(f'CREATE "{wire}"')
        stored = imap.append(wire, _message(1), ("\\Seen", "$Forwarded"), 978_307_200.0)
        assert stored is not None and stored[1] == "1"  # UIDPLUS: where it went
        with pytest.raises(ImapCommandError) as refused:
            imap.select("No such folder")
        assert refused.value.status == "NO"
        selected = imap.select(wire)  # the refusal left the session usable
        assert selected.exists == 1 and selected.uidvalidity == stored[0]
        [items] = imap.fetch("1", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
        assert items[b"BODY[]"] == _message(1)
        assert set(items[b"FLAGS"]) >= {b"\\Seen", b"$Forwarded"}  # type: ignore[arg-type]
        assert items[b"INTERNALDATE"] == b"01-Jan-2001 00:00:00 +0000"
    [(flags, body)] = _wire_contents(dovecot, USER, wire)
    assert body == _message(1) and b"\\Seen" in flags


def test_a_refused_login_and_a_closed_port_are_told_apart(dovecot: Dovecot) -> None:
    with BlockingImap.connect("127.0.0.1", dovecot.port) as imap, \
            pytest.raises(ImapCommandError):
        imap.login(USER, "wrong")
    with pytest.raises(ImapConnectionError, match=r"IMAP 127\.0\.0\.1:"):
        BlockingImap.connect("127.0.0.1", free_port(), timeout=5)


def test_a_server_that_goes_silent_fails_the_command_instead_of_hanging() -> None:
    """A 'server' that greets, then reads and never answers: the watchdog's timeout."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    conns: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conns.append(conn)
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] silent\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        imap = BlockingImap.connect("127.0.0.1", listener.getsockname()[1], timeout=1.0)
        with pytest.raises(ImapConnectionError, match="no answer"):
            imap.command("NOOP")
        imap.logout()
    finally:
        for conn in conns:
            conn.close()
        listener.close()


def test_imapstore_reads_and_writes_through_the_session(dovecot: Dovecot) -> None:
    login = ImapLogin("bob@corp.example", lambda: MASTER[1], master_user=MASTER[0])
    with imap_session("127.0.0.1", dovecot.port, "none", login, system="s9") as session:
        key = session.append("Projects/Q3", _message(2), "FS", 1_000_000_000.0)
        assert "Projects/Q3" in session.folders()
        [listed] = session.messages("Projects/Q3")
        assert (listed.key, listed.flags, listed.internal_date) == (key, "FS", 1_000_000_000.0)
        assert listed.message_id == "<m2@blocking.test>"
        assert session.read("Projects/Q3", key) == _message(2)
        assert session.size()[1] >= 1
    bad = ImapLogin("bob@corp.example", lambda: "wrong", master_user=MASTER[0])
    with pytest.raises(TemporaryError, match=r"login as master user 'admin' for "
                       r"'bob@corp\.example' refused"), \
            imap_session("127.0.0.1", dovecot.port, "none", bad, system="s9"):
        pass
    with pytest.raises(TemporaryError, match=r"s9: IMAP 127\.0\.0\.1:\d+ unreachable"), \
            imap_session("127.0.0.1", free_port(), "none", login, system="s9"):
        pass


def _local(n: int, folder: str = "Local Folders/Old") -> LocalMessage:
    data = _message(100 + n)
    return LocalMessage(folder=folder, data=data, flags="SRT", internal_date=1_500_000_000.0,
                        sha256=hashlib.sha256(data).hexdigest(), keywords=("$label1",))


def test_the_upload_after_a_crash_finds_the_acknowledged_message(dovecot: Dovecot,
                                                                 tmp_path: Path) -> None:
    account = imapupload.ImapAccount("127.0.0.1", dovecot.port, "none", USER, PASSWORD)
    first, second = _local(1), _local(2)
    # The crash: the intent was written, the server took the APPEND, the process died
    # before the acknowledgement reached the manifest.
    crashed = Manifest(tmp_path, 7)
    with BlockingImap.connect("127.0.0.1", dovecot.port) as imap:
        imap.login(USER, PASSWORD)
        uploader = imapupload.Uploader(imap, crashed)
        name = uploader.ensure(first.folder)
        crashed.intend(first.sha256, first.folder)
        imap.append(name, first.data, ["\\Seen"], first.internal_date)
    counts = imapupload.upload(account, [first, second], Manifest(tmp_path, 7),
                               imapupload.Progress(1))
    assert counts["present"] == 1 and counts["uploaded"] == 1, counts
    stored = _wire_contents(dovecot, USER, name)
    assert sorted(body for _, body in stored) == sorted([first.data, second.data])
    flags = next(f for f, body in stored if body == second.data)
    # S R and the tag as keywords; T (deleted) is never sent.
    assert b"\\Seen" in flags and b"\\Answered" in flags and b"$label1" in flags
    assert b"\\Deleted" not in flags
    again = imapupload.upload(account, [first, second], Manifest(tmp_path, 7),
                              imapupload.Progress(1))
    assert again["skipped"] == 2 and len(_wire_contents(dovecot, USER, name)) == 2


def test_station_agent_errors_name_the_stage(dovecot: Dovecot) -> None:
    ok, text = imapupload.login_test(imapupload.ImapAccount(
        "127.0.0.1", dovecot.port, "none", USER, PASSWORD))
    assert ok and "SELECT INBOX ok" in text, text
    ok, text = imapupload.login_test(imapupload.ImapAccount(
        "127.0.0.1", dovecot.port, "none", USER, "wrong"))
    assert not ok and text.startswith(f"IMAP 127.0.0.1:{dovecot.port} LOGIN failed: "), text
    port = free_port()
    reason = imapupload.reachable("127.0.0.1", port, "none", timeout=5)
    assert reason is not None and "Connect" in reason, reason
    # STARTTLS required, not offered (this Dovecot has ssl = no): refused, never in clear.
    with pytest.raises(imapupload.ImapError, match="STARTTLS failed"):
        imapupload.connect(imapupload.ImapAccount("127.0.0.1", dovecot.port, "starttls",
                                                  USER, PASSWORD))
