"""Small pieces of the mover: modified UTF-7, folder mapping, parsing, throttle, progress."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from typing import Any

import pytest

from mailferry.mail.imap import mutf7
from mailferry.mail.imap.client import (
    ImapClient,
    WireHash,
    fetch_items,
    has_bare_lf,
    parse_response,
)
from mailferry.mail.imap.dates import epoch_of, imap_date
from reconciler.mover.endpoints import expand_uid_set, uid_set, wire_form
from reconciler.mover.folders import Folder, FolderRule, canonical, map_folders, native
from reconciler.mover.progress import JsonProgress
from reconciler.mover.throttle import Throttle


@pytest.mark.parametrize(("text", "wire"), [
    ("Éléments envoyés", "&AMk-l&AOk-ments envoy&AOk-s"), ("A&B", "A&-B"),
    ("日本語", "&ZeVnLIqe-"), ("INBOX", "INBOX"), ("~peter/mail/台北", "~peter/mail/&U,BTFw-")])
def test_modified_utf7(text: str, wire: str) -> None:
    assert mutf7.encode(text) == wire
    assert mutf7.decode(wire) == text


def test_canonical_names_and_mapping() -> None:
    assert canonical("INBOX.Archive.2023", ".", "INBOX.") == "Archive/2023"
    assert native("Archive/2023", ".", "INBOX.") == "INBOX.Archive.2023"
    assert native("INBOX", ".", "INBOX.") == "INBOX"
    src = [Folder("INBOX", "INBOX"), Folder("Sent Items", "Sent Items", "\\Sent"),
           Folder("Old/2019", "Old.2019"), Folder("Misc", "Misc")]
    dst = [Folder("Sent", "INBOX.Sent", "\\Sent")]
    got = map_folders(src, dst, [FolderRule("Old.*", "Archive/*")], ".")
    assert got == {"INBOX": "INBOX", "Sent Items": "Sent", "Old/2019": "Archive/2019",
                   "Misc": "Misc"}
    two_sent = [*src, Folder("Envoyés", "Envoyés", "\\Sent")]
    assert map_folders(two_sent, dst)["Sent Items"] == "Sent Items"  # ambiguous: no mapping


def test_parse_fetch_with_literal_and_uid_sets() -> None:
    resp = parse_response([
        b'7 FETCH (UID 42 RFC822.SIZE 11 FLAGS (\\Seen $Work) INTERNALDATE '
        b'"01-Feb-2024 10:00:00 +0100" BODY[HEADER.FIELDS (MESSAGE-ID)] {5}\r\n',
        b"hello", b")"])
    items = fetch_items(resp)
    assert items is not None
    assert items[b"UID"] == b"42" and items[b"FLAGS"] == [b"\\Seen", b"$Work"]
    assert items[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"] == b"hello"
    assert uid_set(["1", "2", "3", "7", "9", "10"]) == "1:3,7,9:10"
    assert expand_uid_set("5:7,9") == ["5", "6", "7", "9"]
    assert epoch_of("01-Feb-2024 10:00:00 +0100") == epoch_of(imap_date(1706778000.0))
    assert wire_form(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"


@pytest.mark.parametrize("data", [
    b"a\r\nb\r\n", b"\na\r\n", b"a\nb", b"a\r\n\nb", b"\r\n\r\n", b"\r\r\n\n\r",
    b"x" * 40 + b"\r\n" + b"y" * 40 + b"\n", b"\n\n\n", b"no line end at all"])
def test_wire_hash_in_any_chunks_is_the_hash_of_the_wire_form(data: bytes) -> None:
    """Fed in chunks cut anywhere (a CR at one chunk's end, its LF at the next one's start
    included), the streamed hash is the wire form's, and a bare LF is seen wherever it is."""
    whole = hashlib.sha256(wire_form(data)).hexdigest()
    assert has_bare_lf(data) == (wire_form(data) != data)
    for cut in range(len(data) + 1):
        for second in range(cut, len(data) + 1):
            wire = WireHash()
            out = b"".join(wire.update(part) for part in
                           (data[:cut], data[cut:second], data[second:]))
            assert (wire.hexdigest(), out) == (whole, wire_form(data)), (cut, second)


def test_throttle_waits_for_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("reconciler.mover.throttle.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("reconciler.mover.throttle.asyncio.sleep", fake_sleep)

    async def go() -> None:
        throttle = Throttle(messages_per_second=2, bytes_per_second=1000)
        for _ in range(6):
            await throttle.take(100)
    asyncio.run(go())
    # 2 messages of burst, then one every 0.5 s: 4 more need 2 s of (fake) waiting.
    assert sum(slept) == pytest.approx(2.0, abs=0.01)


def test_json_progress_events() -> None:
    out = io.StringIO()
    progress = JsonProgress(out, interval=0)
    progress.run_started(1)
    progress.mailbox_started("u1", 10, 1000)
    progress.advanced("u1", 4, 400, copied=4)
    progress.mailbox_done("u1", {"verified": True, "copied": 4})
    progress.run_done()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["mailbox", "progress", "done", "run"]
    assert all(e["format"] == "mailferry.mover/v1" for e in events)
    assert events[-1]["copied"] == 4 and events[-1]["messages"] == 10


def test_a_server_dropping_pipelined_commands_gets_one_at_a_time_on_the_retry() -> None:
    """An IMAP server on 127.0.0.1 that throws away the rest of each read after its first
    command: the login goes alone anyway (RFC 3501 5.5), NAMESPACE and LIST go together and
    the LIST is lost; that silence costs one timeout, and the retry (and every later
    connection to that server) sends one command at a time and works."""
    from mailferry.mail.imap.client import NO_PIPELINING, ImapConnectionError
    from reconciler.drivers.base import ImapAccount
    from reconciler.mover.endpoints import ImapEndpoint

    reads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] fake\r\n")
        while data := await reader.read(65536):
            reads.append(data)
            line = data.split(b"\r\n", 1)[0]  # the rest of this read is dropped
            tag, _, command = line.partition(b" ")
            verb = command.split(b" ", 1)[0].upper()
            if verb == b"AUTHENTICATE":
                writer.write(tag + b" OK [CAPABILITY IMAP4rev1 NAMESPACE SPECIAL-USE "
                             b"LIST-STATUS] in\r\n")
            elif verb == b"NAMESPACE":
                writer.write(b'* NAMESPACE (("" "/")) NIL NIL\r\n' + tag + b" OK done\r\n")
            elif verb == b"LIST":
                writer.write(b'* LIST () "/" INBOX\r\n'
                             b"* STATUS INBOX (UIDVALIDITY 7 UIDNEXT 3 MESSAGES 2)\r\n"
                             + tag + b" OK done\r\n")
            elif verb == b"LOGOUT":
                writer.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
                break
            await writer.drain()
        writer.close()

    async def scenario() -> tuple[str, list[str], dict[str, str]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        account = ImapAccount("127.0.0.1", port, "u", "pw", timeout=0.5)
        try:
            first = ImapEndpoint(account)
            with pytest.raises(ImapConnectionError) as failed:
                await first.open()
            again = ImapEndpoint(account)
            await again.open()
            names = [f.name for f in await again.folders()]
            await again.close()
            return str(failed.value), names, again.folder_status
        finally:
            server.close()

    error, names, status = asyncio.run(scenario())
    assert "LIST" in error
    assert names == ["INBOX"] and status == {"INBOX": "7/3/2"}
    assert reads[0].count(b"\r\n") == 1 and b"AUTHENTICATE" in reads[0]  # login alone
    assert reads[1].count(b"\r\n") == 2  # NAMESPACE and LIST pipelined at first
    assert all(r.count(b"\r\n") == 1 for r in reads[2:])  # then one command at a time
    NO_PIPELINING.clear()



class LateClient(ImapClient):
    """Returns from `connect` only after `pause` seconds (the reader has seen what came)."""

    pause = 0.0

    @classmethod
    async def connect(cls, host: str, port: int, **kw: Any) -> ImapClient:
        client = await super().connect(host, port, **kw)
        await asyncio.sleep(cls.pause)
        return client


@pytest.mark.parametrize("pause", [0.0, 0.2])
def test_a_server_gone_after_its_greeting_is_a_connection_error(pause: float) -> None:
    """The close seen before the login is written (pause) or after: a retryable error."""
    from mailferry.mail.imap.client import ImapConnectionError
    from reconciler.drivers.base import ImapAccount
    from reconciler.mover.endpoints import ImapEndpoint

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] leaving\r\n")
        await writer.drain()
        writer.close()

    class Late(LateClient):
        pass

    Late.pause = pause

    class Endpoint(ImapEndpoint):
        client_type = Late

    async def scenario() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ImapConnectionError):
                await Endpoint(ImapAccount("127.0.0.1", port, "u", "pw", timeout=2)).open()
        finally:
            server.close()

    asyncio.run(scenario())
