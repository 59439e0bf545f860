"""A Dovecot of this host as target, its Maildir written directly (`--dst-dovecot-config`,
`reconciler/mover/dovecot_direct.py`), against real Dovecot servers: big messages become
Maildir files that Dovecot serves byte for byte with their flags, dates and sizes, small
ones and keywords go over IMAP, a lost manifest or a kill -9 mid-file never duplicates, a
configuration that could store a file otherwise gets every message over IMAP (nothing
written into the Maildir), and a file changed after it was written is not proven."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_mover_imap import REPO, fill, login, q, snapshot, store
from test_mover_stream import MB, Relay, big, hashes

from mailferry.mail.imap.client import Untagged
from reconciler.drivers.base import ImapAccount
from reconciler.mover import dovecot_direct, endpoints
from reconciler.mover.dovecot_direct import DovecotDirectEndpoint, DovecotLayout, letters
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport
from reconciler.mover.runner import Job, run_jobs_async

from dovecot import Dovecot, DovecotPair, serve_pair

USERS = ("ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ida")
NORDIC = "R\u00e4ksm\u00f6rg\u00e5s/Sub"  # a non-ASCII folder below another


@pytest.fixture(scope="module")
def pair() -> Iterator[DovecotPair]:
    yield from serve_pair(USERS)


def _copy(pair: DovecotPair, user: str, state: Path, *, config: Path | None = None,
          endpoint: type[DovecotDirectEndpoint] = DovecotDirectEndpoint,
          dst_port: int | None = None,
          made: list[DovecotDirectEndpoint] | None = None) -> MailboxReport:
    src = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
    dst = ImapAccount("127.0.0.1", dst_port or pair.dst.port, user, f"pw-{user}", timeout=15)
    layout = DovecotLayout(config or pair.dst.conf)

    def target() -> DovecotDirectEndpoint:
        made_now = endpoint(dst, layout)
        if made is not None:
            made.append(made_now)
        return made_now

    job = Job(user, lambda: ImapEndpoint(src, readonly=True), target)
    return asyncio.run(run_jobs_async([job], manifest=Manifest(store(state))))[0]


def our_files(server: Dovecot, user: str) -> list[Path]:
    """The message files the mover wrote itself (its base names: ...P<pid>Q<n>...)."""
    root = server.dir / "mail" / user / "Maildir"
    return [p for p in root.rglob("cur/*") if "Q" in p.name.split(".", 2)[1]]


def sizes(server: Dovecot, user: str, folder: str) -> Counter[int]:
    """RFC822.SIZE of every message of a folder, as Dovecot answers it."""
    conn = login(server, user)
    conn.select(q(folder), readonly=True)
    _, data = conn.uid("FETCH", "1:*", "(RFC822.SIZE)")
    conn.logout()
    return Counter(int(item.split(b"RFC822.SIZE ")[1].rstrip(b")"))
                   for item in data if isinstance(item, bytes))


def test_a_lookup_and_a_read_back_in_flight_take_only_their_own_responses() -> None:
    """Two FETCHes in flight on one connection: the X-GUID lookup's responses carry no
    body, and a read-back's filter (`_asked`) takes only bodies of its UIDs, so neither
    swallows the other's (Dovecot answers pipelined FETCHes interleaved)."""
    read_back = endpoints._asked(["1", "7"])
    lookup: Untagged = [b"1", b"FETCH", [b"UID", b"1", b"X-GUID", b"1796.M1P2Q3.host,S=9"]]
    body: Untagged = [b"1", b"FETCH", [b"UID", b"1", b"BODY[]", b"data"]]
    flags: Untagged = [b"1", b"FETCH", [b"FLAGS", [b"\\Seen"], b"UID", b"1"]]
    other: Untagged = [b"2", b"FETCH", [b"UID", b"2", b"BODY[]", b"data"]]
    assert read_back(body) and not read_back(lookup) and not read_back(flags)
    assert not read_back(other)


def test_letters_are_dovecots_and_a_keyword_has_none() -> None:
    assert letters(["\\Seen", "\\Answered", "\\Flagged", "\\Recent"]) == "FRS"
    assert letters(["\\Deleted", "\\Draft"]) == "DT"
    assert letters([]) == ""
    assert letters(["\\Seen", "$Forwarded"]) is None  # dovecot-keywords: over IMAP
    assert letters(["Work"]) is None


def test_big_messages_become_maildir_files_dovecot_serves_as_the_source_did(
        pair: DovecotPair, tmp_path: Path) -> None:
    """Three big messages without keywords (two folders, one of them non-ASCII and
    nested, one body with bare LFs) are written as files; a big one with a keyword and
    a small one go over IMAP. The target then serves every message byte for byte with
    the source's flags and INTERNALDATE, its RFC822.SIZE is the source's (the W= in the
    name), the copy is proven, and a re-run copies nothing. Counted on the target's wire:
    the big ones' bytes never went to it, neither as an APPEND nor as a read-back."""
    user = "ann"
    lf_body = big(4, 2 * MB).replace(b"\r\n", b"\n")
    fill(pair.src, user, {
        "INBOX": [(big(1, 3 * MB), "\\Seen \\Answered"), (b"Subject: s\r\n\r\nsmall\r\n", ""),
                  (big(2, 2 * MB), "\\Flagged $Work")],
        NORDIC: [(big(3, 5 * MB), "\\Draft"), (lf_body, "")],
    })
    relay = Relay(pair.dst.port)
    made: list[DovecotDirectEndpoint] = []
    try:
        report = _copy(pair, user, tmp_path, dst_port=relay.port, made=made)
    finally:
        relay.close()
    assert report.verified and report.copied == 5, report.as_dict()
    assert snapshot(pair.dst, user) == snapshot(pair.src, user)
    assert len(our_files(pair.dst, user)) == 3
    # the one big message with a keyword (1.8 MB); any other would add 1.8 to 4.4 MB
    assert 1.5 * MB < len(relay.sent) < 2.5 * MB
    # its read-back and the small one's: the files' UIDs were all found by X-GUID, beside
    # those read-backs in flight on the same connection (under CI's load a read-back's
    # body once went to the lookup's FETCH and was fetched again: `_asked`)
    assert sum(e.unnumbered for e in made) == 0
    assert relay.sent.count(b"BODY.PEEK[]") == 2
    for folder in ("INBOX", NORDIC):
        assert sizes(pair.dst, user, folder) == sizes(pair.src, user, folder)
    again = _copy(pair, user, tmp_path)
    assert again.verified and again.copied == 0 and again.present == 5, again.as_dict()
    assert set(hashes(pair.dst, user).values()) == {1}


def test_a_copy_no_manifest_remembers_is_found_not_written_again(
        pair: DovecotPair, tmp_path: Path) -> None:
    """A manifest lost after the files were linked (a crash before the mover recorded
    them): the next run finds the copies by content over IMAP and writes none again."""
    user = "ben"
    fill(pair.src, user, {"INBOX": [(big(i, 2 * MB), "") for i in range(3)]})
    first = _copy(pair, user, tmp_path / "first")
    assert first.verified and first.copied == 3, first.as_dict()
    fresh = _copy(pair, user, tmp_path / "lost")
    assert fresh.verified and fresh.copied == 0 and fresh.present == 3, fresh.as_dict()
    assert len(our_files(pair.dst, user)) == 3
    assert hashes(pair.dst, user) == hashes(pair.src, user)


@pytest.mark.parametrize(("extra", "reason"), [
    ("mail_plugins = $mail_plugins zlib\n", "zlib"),
    ("protocol imap {\n  mail_plugins = $mail_plugins quota imap_quota\n}\n", "quota"),
    ("mail_location = mdbox:~/mdbox\n", "not a Maildir"),
])
def test_a_dovecot_that_could_store_a_file_otherwise_gets_it_over_imap(
        pair: DovecotPair, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        extra: str, reason: str) -> None:
    """The admin's configuration compresses, counts quota or is no Maildir: no file is
    written into the Maildir, a warning names the reason, and the big message goes over
    IMAP APPEND (counted on the target's wire), proven as any other copy."""
    user = {"zlib": "cat", "quota": "gus", "not a Maildir": "hal"}[reason]
    fill(pair.src, user, {"INBOX": [(big(1, 2 * MB), ""), (b"Subject: s\r\n\r\ns\r\n", "")]})
    config = tmp_path / "dovecot.conf"
    config.write_text(pair.dst.conf.read_text() + extra)
    relay = Relay(pair.dst.port)
    try:
        with caplog.at_level(logging.WARNING, "mailferry.mover.dovecot"):
            report = _copy(pair, user, tmp_path, config=config, dst_port=relay.port)
    finally:
        relay.close()
    assert report.verified and report.copied == 2 and report.attempts == 1, report.as_dict()
    assert our_files(pair.dst, user) == []
    assert len(relay.sent) > 1.5 * MB  # the big one's APPEND
    assert hashes(pair.dst, user) == hashes(pair.src, user)
    warned = [r.getMessage() for r in caplog.records if r.name == "mailferry.mover.dovecot"]
    assert len(warned) == 1 and reason in warned[0] and "over IMAP" in warned[0], warned


class Tampering(DovecotDirectEndpoint):
    """A target whose files change after they are written (another program, a broken
    file system): one byte of every file it links is replaced."""

    @staticmethod
    def _link_synced(job: dovecot_direct._Streaming, tmp: Path, wire_size: int | None
                     ) -> Path:
        path = DovecotDirectEndpoint._link_synced(job, tmp, wire_size)
        with open(path, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(b"#" if byte != b"#" else b"%")
        return path


def test_a_file_changed_after_it_was_written_is_not_proven(
        pair: DovecotPair, tmp_path: Path) -> None:
    """The read-back of a written file hashes what is on disk, not what was sent: a
    changed file is reported altered, the mailbox is not verified (E41 keeps BOX1)."""
    user = "dan"
    fill(pair.src, user, {"INBOX": [(big(1, 3 * MB), ""), (big(2, 2 * MB), "")]})
    report = _copy(pair, user, tmp_path, endpoint=Tampering)
    assert report.copied == 2 and not report.verified, report.as_dict()
    assert report.altered == 2 and report.missing == 0, report.as_dict()


def test_kill_9_while_a_file_is_written_then_rerun_leaves_each_message_once(
        pair: DovecotPair, tmp_path: Path) -> None:
    """The CLI copies into the target's Maildir (`--dst-dovecot-config`) from a source
    slowed to 3 MB/s, and is killed (SIGKILL) once one message is in cur/ and the next is
    half in tmp/; a re-run copies the rest: every message exactly once, proven, and the half
    file never became a message."""
    user = "eve"
    fill(pair.src, user, {"INBOX": [(big(i, 6 * MB), "\\Seen") for i in range(4)]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")

    def command(src_port: int) -> list[str]:
        return [sys.executable, "-m", "reconciler.mover", "copy",
                "--src", f"127.0.0.1:{src_port}", "--dst", f"127.0.0.1:{pair.dst.port}",
                "--dst-dovecot-config", str(pair.dst.conf), "--users", str(users),
                "--state", str(tmp_path / "state.db"), "--progress", "none",
                "--report", "json"]

    tmp = pair.dst.dir / "mail" / user / "Maildir" / "tmp"
    slow = Relay(pair.src.port, rate=3 * MB)
    mover = subprocess.Popen(command(slow.port), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
                our_files(pair.dst, user) and tmp.is_dir()
                and any(f.stat().st_size > MB for f in tmp.iterdir())):
            time.sleep(0.05)
        os.kill(mover.pid, signal.SIGKILL)
    finally:
        mover.kill()
        mover.wait(timeout=30)
        slow.close()
    done = our_files(pair.dst, user)
    left = list(tmp.iterdir())
    assert 1 <= len(done) < 4 and left, (done, left)  # killed mid-file, as wanted
    again = subprocess.run(command(pair.src.port), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert hashes(pair.dst, user) == hashes(pair.src, user)
    assert set(hashes(pair.dst, user).values()) == {1}
    assert snapshot(pair.dst, user) == snapshot(pair.src, user)
    assert [f for f in tmp.iterdir()] == left  # the half file stayed where Dovecot ignores it


def test_a_folder_the_copy_creates_gets_its_files_where_dovecot_looks(
        pair: DovecotPair, tmp_path: Path) -> None:
    """A folder made by the copy itself (CREATE over IMAP) receives files at the path
    doveadm names for it: Dovecot lists the folder and serves the messages."""
    user = "fay"
    fill(pair.src, user, {"Archive/2024": [(big(1, 2 * MB), "\\Seen")]})
    report = _copy(pair, user, tmp_path)
    assert report.verified and report.copied == 1, report.as_dict()
    conn = login(pair.dst, user)
    typ, data = conn.select(q("Archive/2024"), readonly=True)
    conn.logout()
    assert typ == "OK" and data == [b"1"]
    assert snapshot(pair.dst, user) == snapshot(pair.src, user)



def test_a_tmp_file_the_mover_cannot_make_sends_the_message_over_imap(
        pair: DovecotPair, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The new file cannot be made in tmp/ (here: its name is taken, as a file another
    writer left; a read-only mount or permissions fail the same call): the file already
    there is left as it was, a warning names the folder and the reason, and the message
    goes over IMAP, proven."""
    user = "ida"
    fill(pair.src, user, {"INBOX": [(big(1, 2 * MB), "\\Seen")]})
    conn = login(pair.dst, user)
    conn.select("INBOX")  # Dovecot makes the Maildir when it is first opened
    conn.logout()
    tmp = pair.dst.dir / "mail" / user / "Maildir" / "tmp"
    taken = tmp / "taken.base"
    taken.write_bytes(b"someone else's")
    monkeypatch.setattr(dovecot_direct, "new_base", lambda: "taken.base")
    with caplog.at_level(logging.WARNING, "mailferry.mover.dovecot"):
        report = _copy(pair, user, tmp_path)
    assert report.verified and report.copied == 1, report.as_dict()
    assert taken.read_bytes() == b"someone else's"
    assert our_files(pair.dst, user) == []
    assert hashes(pair.dst, user) == hashes(pair.src, user)
    warned = [r.getMessage() for r in caplog.records if r.name == "mailferry.mover.dovecot"]
    assert len(warned) == 1 and str(tmp) in warned[0] and "exists" in warned[0], warned


def test_the_flag_needs_an_imap_target(tmp_path: Path) -> None:
    """`--dst-dovecot-config` with a maildir: target is a usage error, said before any copy."""
    users = tmp_path / "users.txt"
    users.write_text("u pw\n")
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.mover", "copy", "--src", "127.0.0.1:1",
         "--dst", f"maildir:{tmp_path / 'box'}", "--dst-dovecot-config", "/etc/dovecot.conf",
         "--users", str(users), "--no-state", "--progress", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--dst-dovecot-config needs an IMAP --dst" in done.stderr, done.stderr
    assert not (tmp_path / "box").exists()
