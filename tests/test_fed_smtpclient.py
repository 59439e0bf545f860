"""fed's own SMTP/LMTP client (fed/delivery/smtpclient.py) against a scripted server.

Each test plays the server's side as a dialogue (tests/scripted_smtp.py) on 127.0.0.1,
so it can do what Postfix and Dovecot do only on a bad day: reply over several lines,
refuse one recipient of three, break the link between two LMTP per-recipient replies,
insist on STARTTLS, or say nothing at all. The scripts assert what the client sent, in
what order and in how many writes; the tests assert what the client made of the replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from fed.delivery.smtpclient import ClientError, Connection, Reply

from scripted_smtp import Peer, ScriptedServer

T = TypeVar("T")
MESSAGE = b"Subject: t\r\nMessage-ID: <t@test>\r\n\r\n.a line that starts with a dot\r\nbody\r\n"
A, B, C = "a@s1.invalid", "b@s1.invalid", "c@s1.invalid"


def run(session: Callable[[Peer], Awaitable[None]],
        client: Callable[[int], Awaitable[T]]) -> T:
    """Serve `session`, run `client(port)` against it; the script's failures fail too."""
    async def main() -> T:
        async with asyncio.timeout(10), ScriptedServer(session) as server:
            return await client(server.port)

    return asyncio.run(main())


async def greet(peer: Peer, *hello: str, lmtp: bool = True) -> None:
    """Greeting, then LHLO/EHLO answered with `hello` (default: PIPELINING offered)."""
    await peer.say("220 scripted ready")
    assert await peer.hear() == f"{'LHLO' if lmtp else 'EHLO'} fed.test"
    await peer.say(*(hello or ("250-scripted", "250-PIPELINING", "250 8BITMIME")))


async def connect(port: int, lmtp: bool = True, timeout: float = 2.0) -> Connection:
    return await Connection.open("127.0.0.1", port, lmtp, "fed.test", timeout)


def test_multi_line_replies_are_read_whole() -> None:
    """A greeting, a LHLO and a per-recipient reply over several lines: one reply each,
    its code from the last line, its text every line's; the extensions are the LHLO's."""
    async def session(peer: Peer) -> None:
        await peer.say("220-scripted.test ESMTP", "220-no UCE", "220 ready")
        assert await peer.hear() == "LHLO fed.test"
        await peer.say("250-scripted.test", "250-PIPELINING", "250-SIZE 10240000",
                       "250 ENHANCEDSTATUSCODES")
        assert [await peer.hear() for _ in range(3)] == [
            "MAIL FROM:<s@x.example>", f"RCPT TO:<{A}>", "DATA"]
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
        assert await peer.message() == MESSAGE
        await peer.say("452-4.2.2 mailbox full:", "452-4.2.2 quota 100 MB,",
                       "452 4.2.2 try later")
        assert await peer.hear() == "RSET"  # nothing was delivered: start clean
        await peer.say("250 2.0.0 Ok")
        assert await peer.hear() == "QUIT"
        await peer.say("221 bye")

    async def client(port: int) -> tuple[set[str], dict[str, Reply], bool]:
        conn = await connect(port)
        replies = await conn.send("s@x.example", [A], MESSAGE)
        broken = conn.broken
        await conn.quit()
        return conn.extensions, replies, broken

    extensions, replies, broken = run(session, client)
    assert extensions == {"PIPELINING", "SIZE", "ENHANCEDSTATUSCODES"}
    assert replies == {A: Reply(452, "4.2.2 mailbox full:\n4.2.2 quota 100 MB,\n"
                                     "4.2.2 try later")}
    assert replies[A].status == "4.2.2" and not replies[A].permanent
    assert not broken


def test_lmtp_replies_read_before_the_link_broke_stand() -> None:
    """LMTP answers each recipient after DATA. The link breaks after two of three
    replies: those two stand (the first mailbox has the message, a retry would deliver it
    twice), only the third gets the error; the connection is broken."""
    async def session(peer: Peer) -> None:
        await greet(peer)
        assert len([await peer.hear() for _ in range(5)]) == 5  # MAIL, 3 RCPT, DATA
        await peer.say("250 2.1.0 Ok", *["250 2.1.5 Ok"] * 3, "354 go ahead")
        await peer.message()
        await peer.say(f"250 2.0.0 <{A}> delivered", f"452 4.2.2 <{B}> over quota")
        peer.drop()

    async def client(port: int) -> tuple[dict[str, Reply], bool, bool]:
        conn = await connect(port)
        replies = await conn.send("s@x.example", [A, B, C], MESSAGE)
        return replies, conn.broken, conn.data_sent

    replies, broken, data_sent = run(session, client)
    assert replies[A] == Reply(250, f"2.0.0 <{A}> delivered")
    assert replies[B] == Reply(452, f"4.2.2 <{B}> over quota")
    assert replies[C].code == 0 and "127.0.0.1" in replies[C].text
    assert broken and data_sent


@pytest.mark.parametrize("lmtp", [True, False])
def test_each_recipient_keeps_its_own_4xx_or_5xx(lmtp: bool) -> None:
    """Refused at RCPT (550 for one, 451 for another): those keep their refusal, the
    message goes to the rest. After DATA, LMTP answers per recipient (a 552 for one),
    SMTP once for all accepted."""
    async def session(peer: Peer) -> None:
        await greet(peer, lmtp=lmtp)
        assert [await peer.hear() for _ in range(5)] == [
            "MAIL FROM:<s@x.example>", f"RCPT TO:<{A}>", f"RCPT TO:<{B}>",
            f"RCPT TO:<{C}>", "DATA"]
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 no such user",
                       "451 4.3.0 try again", "354 go ahead")
        await peer.message()
        await peer.say("250 2.0.0 delivered")
        assert await peer.hear() == "QUIT"
        await peer.say("221 bye")

    async def session_lmtp_two(peer: Peer) -> None:
        await greet(peer)
        assert len([await peer.hear() for _ in range(4)]) == 4
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 go ahead")
        await peer.message()
        await peer.say("552 5.2.2 over quota for good", "250 2.0.0 delivered")
        assert await peer.hear() == "QUIT"
        await peer.say("221 bye")

    async def client(port: int) -> dict[str, Reply]:
        conn = await connect(port, lmtp)
        replies = await conn.send("s@x.example", [A, B, C], MESSAGE)
        await conn.quit()
        return replies

    replies = run(session, client)
    assert replies == {A: Reply(250, "2.0.0 delivered"), B: Reply(550, "5.1.1 no such user"),
                       C: Reply(451, "4.3.0 try again")}
    assert replies[B].permanent and not replies[C].permanent
    if lmtp:
        async def two(port: int) -> dict[str, Reply]:
            conn = await connect(port)
            replies = await conn.send("s@x.example", [A, B], MESSAGE)
            await conn.quit()
            return replies

        assert run(session_lmtp_two, two) == {A: Reply(552, "5.2.2 over quota for good"),
                                              B: Reply(250, "2.0.0 delivered")}


def test_pipelining_sends_the_whole_envelope_in_one_write() -> None:
    """Offered PIPELINING, the client sends MAIL, every RCPT and DATA before reading a
    reply (RFC 2920): the script reads them all before it answers anything."""
    async def session(peer: Peer) -> None:
        await greet(peer)
        assert await peer.hear() == "MAIL FROM:<s@x.example>"
        await asyncio.sleep(0)  # let a non-pipelining client show itself (it would wait)
        assert peer.pending() == f"RCPT TO:<{A}>\r\nRCPT TO:<{B}>\r\nDATA\r\n".encode()
        assert [await peer.hear() for _ in range(3)] == [
            f"RCPT TO:<{A}>", f"RCPT TO:<{B}>", "DATA"]
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 go ahead")
        await peer.message()
        await peer.say("250 2.0.0 a", "250 2.0.0 b")
        await peer.gone()

    async def client(port: int) -> dict[str, Reply]:
        conn = await connect(port)
        replies = await conn.send("s@x.example", [A, B], MESSAGE)
        conn.close()
        return replies

    assert run(session, client) == {A: Reply(250, "2.0.0 a"), B: Reply(250, "2.0.0 b")}


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    """Not offered PIPELINING, the client sends one command and waits for its reply; with
    every recipient refused it sends no DATA at all."""
    async def session(peer: Peer) -> None:
        await greet(peer, "250-scripted", "250 8BITMIME")
        for command, reply in [("MAIL FROM:<s@x.example>", "250 2.1.0 Ok"),
                               (f"RCPT TO:<{A}>", "550 5.1.1 unknown"),
                               (f"RCPT TO:<{B}>", "550 5.1.1 unknown")]:
            assert await peer.hear() == command
            await asyncio.sleep(0)
            assert peer.pending() == b"", "the client did not wait for the reply"
            await peer.say(reply)
        assert await peer.hear() == "RSET"
        await peer.say("250 2.0.0 Ok")
        await peer.gone()

    async def client(port: int) -> dict[str, Reply]:
        conn = await connect(port)
        replies = await conn.send("s@x.example", [A, B], MESSAGE)
        assert not conn.data_sent and not conn.broken
        conn.close()
        return replies

    assert run(session, client) == {A: Reply(550, "5.1.1 unknown"), B: Reply(550, "5.1.1 unknown")}


def test_a_server_that_insists_on_starttls_refuses_every_recipient_cleanly() -> None:
    """fed's client speaks no TLS (it talks to its systems on a trusted network). A server
    that offers STARTTLS and refuses MAIL without it: every recipient gets that 530, the
    client never tries STARTTLS, resets, and the connection stays usable."""
    async def session(peer: Peer) -> None:
        await greet(peer, "250-scripted", "250-STARTTLS", "250 PIPELINING", lmtp=False)
        assert [await peer.hear() for _ in range(4)] == [
            "MAIL FROM:<s@x.example>", f"RCPT TO:<{A}>", f"RCPT TO:<{B}>", "DATA"]
        await peer.say("530 5.7.0 Must issue a STARTTLS command first",
                       *["503 5.5.1 MAIL first"] * 2, "503 5.5.1 MAIL first")
        assert await peer.hear() == "RSET"
        await peer.say("250 2.0.0 Ok")
        assert await peer.hear() == "QUIT"
        await peer.say("221 bye")

    async def client(port: int) -> tuple[dict[str, Reply], set[str], bool]:
        conn = await connect(port, lmtp=False)
        replies = await conn.send("s@x.example", [A, B], MESSAGE)
        broken = conn.broken
        await conn.quit()
        return replies, conn.extensions, broken

    replies, extensions, broken = run(session, client)
    refusal = Reply(530, "5.7.0 Must issue a STARTTLS command first")
    assert replies == {A: refusal, B: refusal} and refusal.permanent
    assert "STARTTLS" in extensions and not broken


def test_a_refused_greeting_is_a_client_error_with_the_servers_reply() -> None:
    async def session(peer: Peer) -> None:
        await peer.say("554 5.3.2 not accepting connections")
        await peer.gone()

    async def client(port: int) -> Reply:
        with pytest.raises(ClientError) as caught:
            await connect(port)
        return caught.value.reply

    assert run(session, client) == Reply(554, "5.3.2 not accepting connections")


def test_a_server_that_hangs_times_out() -> None:
    """A server that greets and then says nothing: LHLO times out (ClientError, within
    the timeout, not after the test's own limit)."""
    async def session(peer: Peer) -> None:
        await peer.say("220 scripted ready")
        await peer.gone()

    async def client(port: int) -> tuple[Reply, float]:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ClientError) as caught:
            await connect(port, timeout=0.05)
        return caught.value.reply, asyncio.get_running_loop().time() - started

    reply, took = run(session, client)
    assert reply.code == 0 and "timed out" in reply.text
    assert took < 2.0


def test_a_hang_after_the_data_gives_every_lmtp_recipient_the_timeout() -> None:
    """The message went out, then no per-recipient reply comes: each recipient gets the
    timeout (code 0: deferred, never taken as delivered) and data_sent says the message
    may have arrived."""
    async def session(peer: Peer) -> None:
        await greet(peer)
        assert len([await peer.hear() for _ in range(4)]) == 4
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 go ahead")
        await peer.message()
        await peer.gone()

    async def client(port: int) -> tuple[dict[str, Reply], bool, bool]:
        conn = await connect(port, timeout=0.05)
        replies = await conn.send("s@x.example", [A, B], MESSAGE)
        return replies, conn.data_sent, conn.broken

    replies, data_sent, broken = run(session, client)
    assert {r.code for r in replies.values()} == {0}
    assert all("timed out" in r.text for r in replies.values())
    assert data_sent and broken


def test_one_connection_carries_several_transactions() -> None:
    """A kept-open connection: after a refused transaction (RSET) the next one starts
    clean on the same session; the server sees one session."""
    async def session(peer: Peer) -> None:
        await greet(peer)
        assert len([await peer.hear() for _ in range(3)]) == 3
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
        await peer.message()
        await peer.say("451 4.3.0 later")
        assert await peer.hear() == "RSET"
        await peer.say("250 2.0.0 Ok")
        assert len([await peer.hear() for _ in range(3)]) == 3
        await peer.say("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
        assert await peer.message() == MESSAGE
        await peer.say("250 2.0.0 delivered")
        assert await peer.hear() == "QUIT"
        await peer.say("221 bye")

    async def client(port: int) -> tuple[list[dict[str, Reply]], int]:
        conn = await connect(port)
        first = await conn.send("s@x.example", [A], MESSAGE)
        second = await conn.send("s@x.example", [A], MESSAGE)
        await conn.quit()
        return [first, second], conn.transactions

    async def main() -> tuple[list[dict[str, Reply]], int, int]:
        async with asyncio.timeout(10), ScriptedServer(session) as server:
            replies, transactions = await client(server.port)
            return replies, transactions, server.sessions

    replies, transactions, sessions = asyncio.run(main())
    assert replies == [{A: Reply(451, "4.3.0 later")}, {A: Reply(250, "2.0.0 delivered")}]
    assert transactions == 2 and sessions == 1


def test_a_reply_planted_after_the_starttls_220_is_refused_before_any_tls() -> None:
    """STARTTLS command injection turned around (CVE-2011-0411's kind): bytes that came in
    cleartext after the 220 would be read as the encrypted session's first reply. The
    client refuses the connection instead of starting TLS on top of them."""
    async def session(peer: Peer) -> None:
        await greet(peer, "250-scripted", "250 STARTTLS", lmtp=False)
        assert await peer.hear() == "STARTTLS"
        await peer.say("220 2.0.0 Ready to start TLS", "250 planted")
        await peer.gone()

    async def client(port: int) -> Reply:
        with pytest.raises(ClientError) as refused:
            await Connection.open("127.0.0.1", port, False, "fed.test", 2.0, tls="starttls")
        return refused.value.reply

    reply = run(session, client)
    assert reply.code == 0 and "before TLS: refused" in reply.text


def test_an_endless_reply_line_or_a_closed_link_is_a_client_error_not_a_hang() -> None:
    """A server that sends 70 KB without a line end (no SMTP reply is that long), and one
    that closes after the greeting: each a ClientError that says which, the connection
    broken, in well under the timeout."""
    async def endless(peer: Peer) -> None:
        await peer.say("220 scripted ready")
        assert await peer.hear() == "EHLO fed.test"
        peer.writer.write(b"250-" + b"x" * 70_000)
        await peer.gone()

    async def closes(peer: Peer) -> None:
        await peer.say("220 scripted ready")
        assert await peer.hear() == "EHLO fed.test"
        peer.drop()

    async def client(port: int) -> tuple[Reply, float]:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ClientError) as failed:
            await connect(port, lmtp=False, timeout=5.0)
        return failed.value.reply, asyncio.get_running_loop().time() - started

    reply, took = run(endless, client)
    assert reply.code == 0 and "reply line longer than 65536 bytes" in reply.text and took < 4
    reply, took = run(closes, client)
    assert reply.code == 0 and took < 4
    assert "closed the connection" in reply.text or "reset" in reply.text.lower()


def test_a_connection_the_server_closed_while_idle_fails_the_next_send_as_a_client_error(
        ) -> None:
    """An idle connection the server dropped: the next transaction is a ClientError (the
    scheduler's cue for one retry on a new connection), nothing written, not the transport's
    own error. A flood of replies nobody asked for ends the connection too, the EHLO reply
    among them not taken for an answer."""
    async def drops(peer: Peer) -> None:
        await greet(peer, lmtp=False)
        peer.drop()

    async def floods(peer: Peer) -> None:  # the EHLO reply and 1,200 more in one write
        await peer.say("220 scripted ready")
        assert await peer.hear() == "EHLO fed.test"
        await peer.say("250-scripted", "250 PIPELINING", *["250 2.0.0 Ok"] * 1200)
        await peer.gone()

    async def client(port: int) -> tuple[Reply, bool]:
        conn = await connect(port, lmtp=False)
        for _ in range(200):  # bounded: 2 s for the close to arrive
            if conn._replies.failure is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ClientError) as failed:
            await conn.send("s@x.example", [A], MESSAGE)
        return failed.value.reply, conn.broken

    async def flooded(port: int) -> Reply:
        with pytest.raises(ClientError) as failed:
            await connect(port, lmtp=False)
        return failed.value.reply

    reply, broken = run(drops, client)
    assert reply.code == 0 and broken
    reply = run(floods, flooded)
    assert reply.code == 0 and "more than 1000 replies nobody asked for" in reply.text
