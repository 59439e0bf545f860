"""The proof's pure parts and the IMAP client's pipelining rules, against small servers on
127.0.0.1 that misbehave the way real ones were seen to (issue 21): Cyrus answered a
pipelined command's tag twice and lost the next command; some servers answer BAD to what
they do not accept pipelined."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from mailferry.mail.imap.client import (
    NO_PIPELINING,
    Digest,
    ImapClient,
    ImapProtocolError,
    Untagged,
    _digest_literal,
)
from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import ImapEndpoint, content_hash
from reconciler.mover.rewrites import eight_bit_headers_as_x, example, judge

MUNGED = "8bit-headers-as-x"
SENT = ("From: J\u00fcrgen <j@x>\r\nSubject: caf\u00e9\r\n\r\nbody \u00e9t\u00e9\r\n"
        "Content-Type: x\u00e9\r\n").encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_munge8bit_rewrites_the_top_header_only_keeping_the_length() -> None:
    stored = eight_bit_headers_as_x(SENT)
    assert stored.startswith(b"From: JXXrgen <j@x>\r\nSubject: cafXX\r\n\r\n")
    assert stored.endswith("body \u00e9t\u00e9\r\nContent-Type: x\u00e9\r\n".encode())
    assert len(stored) == len(SENT)
    plain = b"From: a@x\r\n\r\nbody \xc3\xa9\r\n"
    assert eight_bit_headers_as_x(plain) is plain  # nothing 8-bit in the header: untouched


def test_judge_identical_equivalent_altered_with_an_example() -> None:
    stored = eight_bit_headers_as_x(SENT)
    assert judge(sha(SENT), SENT, sha(SENT), None, set()).proof == "identical"
    altered = judge(sha(SENT), SENT, sha(stored), stored, set())
    assert altered.altered and altered.proof == f"altered:{MUNGED}"
    assert altered.note == "'From: J\\\\xc3\\\\xbcrgen <j@x>' stored as 'From: JXXrgen <j@x>'"
    accepted = judge(sha(SENT), SENT, sha(stored), stored, {MUNGED})
    assert accepted.proven and accepted.proof == f"equivalent:{MUNGED}"
    # the equivalence is exact: one more changed byte and it is no proof even when accepted
    worse = stored.replace(b"body", b"bodY")
    other = judge(sha(SENT), SENT, sha(worse), worse, {MUNGED})
    assert other.proof == "altered:other" and not other.proven
    assert example(SENT, SENT + b"X-Scanned: yes\r\n") == "body changed from line 6"
    added = b"X-Scanned: yes\r\n" + SENT
    assert example(SENT, added).startswith("'From: J")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64 << 10])
def test_a_body_hashed_as_it_streams_equals_the_content_hash(
        chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bare LF, CRLF split across chunks, CR at a chunk's end: the streamed hash is the
    hash of the wire form, like `content_hash` of the whole."""
    monkeypatch.setattr("mailferry.mail.imap.client._CHUNK", chunk)
    data = b"a\nb\r\nc\r\n\r\nd\n\ne\r" + b"x" * 100 + b"\r\n\n"

    async def go() -> Digest:
        reader = asyncio.StreamReader()
        reader.feed_data(data + b"tail")
        return await _digest_literal(reader, len(data))
    got = asyncio.run(go())
    assert isinstance(got, Digest) and got == b""
    assert got.sha256 == content_hash(data) and got.size == len(data)


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _server(serve: Serve) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_bad_to_a_pipelined_command_is_sent_again_alone_and_pipelining_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    """A server that answers BAD to every command but the first of a read: the BAD one is
    sent once more alone, answered, and from then on one command at a time, with a
    warning naming the server. No timeout is waited for (the connection stays usable)."""
    reads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] fake\r\n")
        while data := await reader.read(65536):
            reads.append(data)
            for i, line in enumerate(data.split(b"\r\n")[:-1]):
                tag = line.split(b" ", 1)[0]
                if i:
                    writer.write(tag + b" BAD pipelining not supported\r\n")
                else:
                    writer.write(b"* STATUS x (MESSAGES 1)\r\n" + tag + b" OK done\r\n")
            await writer.drain()

    async def scenario() -> tuple[list[list[Untagged]], bool, bool]:
        server, port = await _server(serve)
        try:
            client = await ImapClient.connect("127.0.0.1", port, timeout=30)
            # two commands in one write (as NAMESPACE and LIST after a login)
            first, second = await client._send_lines([(b"STATUS x (MESSAGES)", "STATUS"),
                                                      (b"STATUS y (MESSAGES)", "STATUS")])
            answers = [await client.finish(first), await client.finish(second)]
            third = await client.simple("STATUS z (MESSAGES)")
            answers.append(third)
            usable, pipelining = client.usable, client.pipelining
            client.close()
            return answers, usable, pipelining
        finally:
            server.close()

    with caplog.at_level(logging.WARNING, logger="mailferry.mover.imap"):
        answers, usable, pipelining = asyncio.run(scenario())
    try:
        assert all(a and a[0][0] == b"STATUS" for a in answers)  # every command answered
        assert usable and not pipelining
        assert reads[0].count(b"\r\n") == 2  # pipelined at first
        assert all(r.count(b"\r\n") == 1 for r in reads[1:])  # then alone, resent once
        assert len(reads) == 3
        assert "BAD to a pipelined STATUS" in caplog.text and "pipelining off" in caplog.text
        assert "127.0.0.1" in caplog.text
    finally:
        NO_PIPELINING.clear()


def test_a_tag_answered_twice_fails_what_is_in_flight_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Cyrus's answer to a command pipelined behind AUTHENTICATE: the first tag answered OK,
    then BAD 'Already authenticated' with the same tag, and the command after it never.
    What is in flight fails now with a protocol error, not after the timeout."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] fake\r\n")
        data = await reader.read(65536)
        tag = data.split(b" ", 1)[0]
        writer.write(tag + b" OK fine\r\n" + tag + b" BAD Already authenticated\r\n")
        await writer.drain()
        await reader.read(65536)  # stays open, answers nothing more

    async def scenario() -> tuple[BaseException | None, bool, float]:
        server, port = await _server(serve)
        try:
            client = await ImapClient.connect("127.0.0.1", port, timeout=30)
            started = time.monotonic()
            first, second = await client._send_lines([(b"NOOP", "NOOP"),
                                                      (b"STATUS x (MESSAGES)", "STATUS")])
            await client.finish(first)
            error = None
            try:
                await client.finish(second)
            except ImapProtocolError as exc:
                error = exc
            return error, client.usable, time.monotonic() - started
        finally:
            server.close()

    with caplog.at_level(logging.WARNING, logger="mailferry.mover.imap"):
        error, usable, _elapsed = asyncio.run(scenario())
    try:
        assert isinstance(error, ImapProtocolError) and "tagged reply" in str(error)
        assert "Already authenticated" in str(error)
        assert not usable  # never handed back to the pool
        assert any(port for _, port in NO_PIPELINING)  # the retry will not pipeline there
        assert "pipelining off" in caplog.text
    finally:
        NO_PIPELINING.clear()


def test_nothing_is_written_behind_a_state_changing_command_until_it_completes() -> None:
    """RFC 3501 5.5: a command started while EXAMINE is in flight goes out only after the
    EXAMINE's tagged answer; commands that change no state still go together."""
    reads: list[bytes] = []
    early: list[bytes] = []  # what arrived while the EXAMINE was not yet answered

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] fake\r\n")
        pending = b""
        while data := pending or await reader.read(65536):
            pending = b""
            reads.append(data)
            for line in data.split(b"\r\n")[:-1]:
                tag, _, command = line.partition(b" ")
                if command.startswith(b"EXAMINE"):
                    try:  # a slow EXAMINE: does anything come before its answer?
                        pending = await asyncio.wait_for(reader.read(65536), 0.3)
                        early.append(pending)
                    except TimeoutError:
                        pass
                    writer.write(b"* 0 EXISTS\r\n")
                writer.write(tag + b" OK done\r\n")
            await writer.drain()

    async def scenario() -> None:
        server, port = await _server(serve)
        try:
            client = await ImapClient.connect("127.0.0.1", port, timeout=30)
            examine = asyncio.create_task(client.simple('EXAMINE "INBOX"'))
            await asyncio.sleep(0)  # the EXAMINE is written first
            noop = asyncio.create_task(client.simple("NOOP"))
            await asyncio.gather(examine, noop)
            first, second = await client._send_lines([(b"NOOP", "NOOP"), (b"NOOP", "NOOP")])
            await client.finish(first)
            await client.finish(second)
            client.close()
        finally:
            server.close()

    asyncio.run(scenario())
    assert early == []  # nothing was written behind the EXAMINE before its answer
    assert reads[0].startswith(b"M1 EXAMINE") and reads[1].startswith(b"M2 NOOP")
    assert reads[2].count(b"\r\n") == 2  # stateless commands still pipelined


def test_each_fetch_in_flight_gets_the_responses_for_its_own_uids() -> None:
    """Two read-backs in flight on one connection (consecutive APPENDs' copies), answered
    in the other order: each gets its own message's body. Before, a FETCH response went
    to the first FETCH in flight whatever it asked for and was dropped there, so the
    other read-back "never came back" (an altered big copy was then reported missing
    instead of altered: the flake of test_a_target_that_changes_a_streamed_message)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] fake\r\n")
        tags: list[bytes] = []
        while len(tags) < 2 and (line := await reader.readline()):
            tags.append(line.split(b" ", 1)[0])
        # the second command's UID first, then the first's
        writer.write(b"* 2 FETCH (UID 6 BODY[] {3}\r\nsix)\r\n" + tags[1] + b" OK done\r\n"
                     b"* 1 FETCH (UID 5 BODY[] {4}\r\nfive)\r\n" + tags[0] + b" OK done\r\n")
        await writer.drain()
        await reader.read()

    async def scenario() -> tuple[dict[str, bytes], dict[str, bytes]]:
        server, port = await _server(serve)
        try:
            endpoint = ImapEndpoint(ImapAccount("127.0.0.1", port, "u", "p", timeout=30))
            endpoint.client = await ImapClient.connect("127.0.0.1", port, timeout=30)
            endpoint._selected = "INBOX"
            got: tuple[dict[str, bytes], dict[str, bytes]] = ({}, {})

            def sink(into: dict[str, bytes]) -> Callable[..., Awaitable[None]]:
                async def put(uid: str, data: bytes, *_: object) -> None:
                    into[uid] = data
                return put
            await asyncio.gather(endpoint.fetch("INBOX", ["5"], sink(got[0])),
                                 endpoint.fetch("INBOX", ["6"], sink(got[1])))
            endpoint.client.close()
            return got
        finally:
            server.close()

    first, second = asyncio.run(scenario())
    assert first == {"5": b"five"} and second == {"6": b"six"}
