"""Big messages stream from the source's FETCH into the target's APPEND (issue 22), against
real Dovecot servers, through a relay that counts, cuts or rewrites what passes: byte for
byte copies in bounded memory, a break mid-literal resumed without a duplicate, a target
that rewrites what it serves still caught, and a no-op re-run in a new process that fetches
no body at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_mover_imap import REPO, fill, snapshot, store

from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import ImapEndpoint, content_hash
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.runner import Job, run_jobs_async

from dovecot import Dovecot, DovecotPair, serve_pair

USERS = ("sam", "tess", "uma", "vic", "walt", "xena", "yan", "zoe", "abe", "bea")
MB = 1 << 20


@pytest.fixture(scope="module")
def pair() -> Iterator[DovecotPair]:
    yield from serve_pair(USERS)


class Relay:
    """A TCP relay to a server on 127.0.0.1 (threads, so a mover in another process can
    use it too). It keeps what clients sent, and may cut the first connection after
    `cut_after` bytes in one direction, replace bytes in what the server sends, or pass
    what the server sends at `rate` bytes/s (a big message then streams for seconds)."""

    def __init__(self, port: int, *, cut_after: int | None = None, cut_up: bool = False,
                 replace: tuple[bytes, bytes] | None = None, rate: int = 0) -> None:
        self.target = port
        self.cut_after, self.cut_up, self.replace = cut_after, cut_up, replace
        self.rate = rate
        self.sent = bytearray()  # every byte any client sent
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                first = self.connections == 0
                self.connections += 1
            cut = self.cut_after if first else None
            threading.Thread(target=self._pipe, args=(client, server, True,
                                                      cut if self.cut_up else None),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False,
                                                      None if self.cut_up else cut),
                             daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, up: bool, cut: int | None) -> None:
        passed = 0
        held = b""
        try:
            while data := a.recv(1 << 16):
                if up:
                    with self._lock:
                        self.sent += data
                if cut is not None and passed + len(data) > cut:
                    b.sendall(data[:cut - passed])
                    with self._lock:
                        self.cuts += 1
                    for s in (a, b):  # a reset, as a crashed server or network gives
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                        s.close()
                    return
                passed += len(data)
                if self.replace is not None and not up:
                    old, new = self.replace
                    data = (held + data).replace(old, new)
                    # hold back only a tail that may be the start of a split `old`
                    keep = next((k for k in range(len(old) - 1, 0, -1)
                                 if data.endswith(old[:k])), 0)
                    data, held = (data[:-keep], data[-keep:]) if keep else (data, b"")
                b.sendall(data)
                if self.rate and not up:
                    time.sleep(len(data) / self.rate)
            b.sendall(held)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def count(self, needle: bytes) -> int:
        with self._lock:
            return bytes(self.sent).count(needle)

    def close(self) -> None:
        self._listener.close()


def big(n: int, size: int, *, subject: str = "big") -> bytes:
    """A message of about `size` bytes whose lines all differ (a chunk never repeats)."""
    head = (f"From: a@x.example\r\nTo: b@x.example\r\nSubject: {subject} {n}\r\n"
            f"Message-ID: <big{n}@x.example>\r\n\r\n").encode()
    lines = b"".join(b"line %08d of message %d: " % (i, n) + b"abcdefghij" * 6 + b"\r\n"
                     for i in range(size // 100 + 1))
    return head + lines[:size - len(head)]


class Counting(ImapEndpoint):
    """The target, counting the APPENDs that streamed."""

    streamed = 0

    async def append_stream(self, *args: object, **kw: object) -> object:
        Counting.streamed += 1
        return await super().append_stream(*args, **kw)  # type: ignore[arg-type]


async def _copy(user: str, src_port: int, dst_port: int, tmp: Path,
                options: Options | None = None) -> MailboxReport:
    src = ImapAccount("127.0.0.1", src_port, user, f"pw-{user}", timeout=15)
    dst = ImapAccount("127.0.0.1", dst_port, user, f"pw-{user}", timeout=15)
    job = Job(user, lambda: ImapEndpoint(src, readonly=True), lambda: Counting(dst),
              options=options or Options())
    return (await run_jobs_async([job], manifest=Manifest(store(tmp))))[0]


def hashes(server: Dovecot, user: str) -> Counter[str]:
    return Counter(content_hash(k[1]) for k, n in snapshot(server, user).items()
                   for _ in range(n))


def test_a_big_message_streams_byte_for_byte_in_bounded_memory(
        pair: DovecotPair, tmp_path: Path) -> None:
    """12 MB and 3 MB bodies (many 256 KB chunks) beside small ones: each big one goes
    through its own streamed APPEND, the target holds every message byte for byte with its
    flags and date, and the copy never held a big body whole (Python's allocations grow by
    far less than one message)."""
    user = "sam"
    messages = [(big(1, 12 * MB), "\\Seen"), (b"Subject: s1\r\n\r\nsmall\r\n", ""),
                (big(2, 3 * MB), "\\Flagged"), (b"Subject: s2\r\n\r\nsmall 2\r\n", "")]
    fill(pair.src, user, {"INBOX": messages})
    fill(pair.src, "zoe", {"INBOX": [(big(3, 2 * MB), "")]})
    asyncio.run(_copy("zoe", pair.src.port, pair.dst.port, tmp_path))  # imports done
    Counting.streamed = 0
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        report = asyncio.run(_copy(user, pair.src.port, pair.dst.port, tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak -= base
    assert report.verified and report.copied == 4, report.as_dict()
    assert Counting.streamed == 2
    assert snapshot(pair.dst, user) == snapshot(pair.src, user)
    assert peak < 8 * MB, f"peak {peak / MB:.1f} MB for a 12 MB message"
    again = asyncio.run(_copy(user, pair.src.port, pair.dst.port, tmp_path))
    assert again.verified and again.copied == 0 and again.present == 4


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_connection_broken_mid_literal_resumes_without_a_duplicate(
        pair: DovecotPair, tmp_path: Path, side: str) -> None:
    """The source's connection reset 2 MB into a 6 MB FETCH literal, or the target's 2 MB
    into the streamed APPEND: the half-sent APPEND is dropped with its connection (the
    server stores an APPEND only once complete), the retry copies the rest, and the
    target holds each message exactly once."""
    user = "tess" if side == "source" else "uma"
    fill(pair.src, user, {"INBOX": [(big(i, 6 * MB), "") for i in range(3)]})
    relay = Relay(pair.src.port if side == "source" else pair.dst.port,
                  cut_after=2 * MB + 123_457, cut_up=side == "target")
    try:
        src, dst = (relay.port, pair.dst.port) if side == "source" \
            else (pair.src.port, relay.port)
        report = asyncio.run(_copy(user, src, dst, tmp_path))
    finally:
        relay.close()
    assert relay.cuts == 1 and report.attempts == 2, report.as_dict()
    assert report.verified
    assert hashes(pair.dst, user) == hashes(pair.src, user)
    assert set(hashes(pair.dst, user).values()) == {1}


def test_a_target_that_changes_a_streamed_message_is_caught(
        pair: DovecotPair, tmp_path: Path) -> None:
    """The target (through a relay) serves one byte changed in a big message it stored:
    the read-back of the streamed copy does not prove it, the mailbox is not verified,
    the copy is named altered (not missing: its read-back came back and was judged), and
    a re-run neither appends it again nor calls it proven."""
    user = "vic"
    fill(pair.src, user, {"INBOX": [(big(1, 3 * MB), ""), (big(2, 2 * MB), "")]})
    relay = Relay(pair.dst.port, replace=(b"line 00012345 of message 1",
                                          b"line 00012345 of message 9"))
    try:
        report = asyncio.run(_copy(user, pair.src.port, relay.port, tmp_path))
        again = asyncio.run(_copy(user, pair.src.port, relay.port, tmp_path))
    finally:
        relay.close()
    assert report.copied == 2 and not report.verified, report.as_dict()
    assert report.altered == 1 and report.folders[0].alteration == "altered:other", \
        report.as_dict()
    assert report.missing == 0, report.as_dict()
    assert again.copied == 0 and not again.verified and again.altered == 1, again.as_dict()
    assert again.missing == 0, again.as_dict()
    assert sum(hashes(pair.dst, user).values()) == 2  # never appended twice


@pytest.mark.parametrize("accept", [False, True])
def test_a_munged_8bit_header_of_a_streamed_message_is_named_or_accepted(
        pair: DovecotPair, tmp_path: Path, accept: bool) -> None:
    """A target that replaces the 8-bit bytes of the top header by 'X' (Cyrus munge8bit,
    played by a relay on what Dovecot serves): a streamed message is reported altered by
    exactly that rewrite, and proven equivalent when the policy accepts it, as a message
    held whole would be."""
    user = "walt" if accept else "xena"
    fill(pair.src, user, {"INBOX": [(big(1, 3 * MB, subject="caf\u00e9"), "")]})
    relay = Relay(pair.dst.port, replace=("caf\u00e9".encode(), b"cafXX"))
    options = Options(accepted=frozenset({"8bit-headers-as-x"}) if accept else frozenset())
    try:
        report = asyncio.run(_copy(user, pair.src.port, relay.port, tmp_path, options))
    finally:
        relay.close()
    assert report.copied == 1
    if accept:
        assert report.verified and report.equivalent == 1, report.as_dict()
    else:
        assert not report.verified and report.altered == 1
        assert report.folders[0].alteration == "altered:8bit-headers-as-x"


# A mover in its own process: a warm-up copy (imports, first connections, one streamed
# message), then the peak resident memory (VmHWM) is reset to the current one
# (/proc/self/clear_refs, "5") and the copy under test runs; prints both. Not ru_maxrss: a
# child's starts at its parent's peak (Linux keeps the forked image's high-water mark
# across exec), here pytest's, which held 50 MB messages.
_MEASURED_COPY = """
import asyncio, json, sys
from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.manifest import Manifest
from reconciler.mover.runner import Job, run_jobs_async
from reconciler.state.store import Store, default_url

src_port, dst_port, state, warm, user = sys.argv[1:]
manifest = Manifest(Store(default_url(state)))

def copy(who):
    acct = lambda port: ImapAccount("127.0.0.1", int(port), who, "pw-" + who, timeout=30)
    job = Job(who, lambda: ImapEndpoint(acct(src_port), readonly=True),
              lambda: ImapEndpoint(acct(dst_port)))
    return asyncio.run(run_jobs_async([job], manifest=manifest))[0]

def kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

copy(warm)
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
base = kb("VmHWM")
report = copy(user)
print(json.dumps({"report": report.as_dict(), "base_kb": base, "peak_kb": kb("VmHWM")}))
"""


def test_a_50_mb_message_is_copied_byte_identical_in_memory_bounded_by_a_constant(
        pair: DovecotPair, tmp_path: Path) -> None:
    """One 50 MB message, copied by a mover in a process of its own: the target holds it
    byte for byte (flags and date too), proven by its read-back, and the process's peak
    resident memory grew by under 16 MB for the copy (read buffers and a chunk or two, not
    the message): a copy that held the body once, as a FETCH response, an APPEND or a
    read-back, would grow by 50 MB or more and fail."""
    user = "abe"
    message = big(7, 50 * MB)
    fill(pair.src, user, {"INBOX": [(message, "\\Seen")]})
    fill(pair.src, "bea", {"INBOX": [(big(8, 2 * MB), ""), (b"Subject: w\r\n\r\nw\r\n", "")]})
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED_COPY, str(pair.src.port), str(pair.dst.port),
         str(tmp_path / "state.db"), "bea", user],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    report = measured["report"]
    assert report["verified"] and report["copied"] == 1, report
    assert snapshot(pair.dst, user) == snapshot(pair.src, user)
    assert hashes(pair.dst, user) == Counter({content_hash(message): 1})
    grown = (measured["peak_kb"] - measured["base_kb"]) * 1024
    assert grown < 16 * MB, f"peak memory grew by {grown / MB:.1f} MB for a 50 MB message"


def test_a_no_op_rerun_in_a_new_process_fetches_no_body(pair: DovecotPair, tmp_path: Path) -> None:
    """Counted on the wire, both sides: the first run fetches every source body and reads
    every copy back; a second run, a new process with the same state store, sends no
    FETCH at all (the folders' UIDVALIDITY/UIDNEXT/MESSAGES prove them unchanged)."""
    user = "yan"
    fill(pair.src, user, {"INBOX": [(big(1, 2 * MB), ""), (b"Subject: a\r\n\r\na\r\n", "")],
                          "Work": [(b"Subject: b\r\n\r\nb\r\n", "\\Seen")]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")
    relays = [Relay(pair.src.port), Relay(pair.dst.port)]

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reconciler.mover", "copy", "--src",
             f"127.0.0.1:{relays[0].port}", "--dst", f"127.0.0.1:{relays[1].port}",
             "--users", str(users), "--state", str(tmp_path / "state.db"),
             "--progress", "none", "--report", "json"],
            cwd=REPO, capture_output=True, text=True, timeout=120)

    try:
        first = cli()
        assert first.returncode == 0, first.stdout + first.stderr
        bodies = [r.count(b"BODY.PEEK[]") for r in relays]
        fetches = [r.count(b" FETCH ") for r in relays]
        assert bodies[0] >= 2 and bodies[1] >= 2  # the counting sees them
        again = cli()
        assert again.returncode == 0, again.stdout + again.stderr
        assert [r.count(b"BODY.PEEK[]") for r in relays] == bodies
        assert [r.count(b" FETCH ") for r in relays] == fetches
    finally:
        for relay in relays:
            relay.close()
    report = json.loads(again.stdout)
    assert report["verified"] and report["copied"] == 0 and report["present"] == 3
    assert json.loads(first.stdout)["copied"] == 3
