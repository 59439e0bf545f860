"""fed's own SMTP session (``fed/smtp/protocol.py``) against a real fed, byte by byte.

Pipelining (several commands, and a whole second transaction, in one write), malformed
commands, over-long lines in both phases, a message over the size limit, a client that
vanishes in the middle of DATA, STARTTLS (and a broken handshake), and the quick address
parser against aiosmtpd's. Each message has its own Message-ID and is counted at the sink.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from fed.smtp.protocol import parse_address

from fedraw import Raw
from fedutil import FakeSystem, Fed, message
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

A = "a@corp.example"


@pytest.fixture(scope="module")
def sink() -> Iterator[FakeSystem]:
    system = FakeSystem("s1").start()
    yield system
    system.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=fed.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, sink: FakeSystem,
        tls_files: tuple[Path, Path]) -> Iterator[Fed]:
    cert, key = tls_files
    running = Fed(tmp_path_factory.mktemp("fed") / "fed", [sink], extra=[
        "--max-size", "20000", "--smtp-timeout", "5", "--tls-cert", str(cert),
        "--tls-key", str(key)]).start()
    running.client.put_entry(A, sink.physical("a"))
    yield running
    running.kill()


def delivered(sink: FakeSystem, msgid: str) -> int:
    return sink.ids().count(f"<{msgid}>")


def queue_files(fed: Fed) -> list[Path]:
    return sorted((fed.state_dir / "spool" / "queue").glob("*.eml"))


def test_pipelined_commands_and_a_second_transaction_in_one_write(
        fed: Fed, sink: FakeSystem) -> None:
    with Raw(fed.smtp_port) as raw:
        raw.sock.sendall(b"EHLO pipe\r\n")
        assert b"250-PIPELINING\r\n" in raw.lines()
        one = message("one", "pipe1@t")
        two = message("two", "pipe2@t")
        raw.send(b"MAIL FROM:<p@outside.example>\r\nRCPT TO:<nobody@corp.example>\r\n"
                 b"RCPT TO:<" + A.encode() + b">\r\nDATA\r\n")
        replies = [raw.reply() for _ in range(4)]
        assert [r[:3] for r in replies] == [b"250", b"550", b"250", b"354"], replies
        # The end of one message, a whole second transaction and QUIT in one write.
        raw.send(one + b".\r\nMAIL FROM:<p@outside.example>\r\nRCPT TO:<" + A.encode()
                 + b">\r\nDATA\r\n")
        replies = [raw.reply() for _ in range(4)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"], replies
        assert b"queued as" in replies[0]
        raw.send(two + b".\r\nQUIT\r\n")
        assert raw.reply().startswith(b"250 2.0.0 Ok: queued as")
        assert raw.reply()[:3] == b"221"
    wait_for(lambda: delivered(sink, "pipe1@t") == 1 and delivered(sink, "pipe2@t") == 1,
             what="both pipelined messages")


def test_malformed_commands_get_their_error_and_the_session_goes_on(fed: Fed) -> None:
    with Raw(fed.smtp_port) as raw:
        assert raw.cmd(b"MAIL FROM:<x@outside.example>")[:3] == b"503"  # no HELO yet
        assert raw.cmd(b"")[:3] == b"500"
        assert raw.cmd(b"\xff\xfe nonsense")[:3] == b"500"
        assert raw.cmd(b"EHLO")[:3] == b"501"
        assert raw.cmd(b"EHLO t")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<" + A.encode() + b">")[:3] == b"503"  # no MAIL yet
        assert raw.cmd(b"MAIL <x@outside.example>")[:3] == b"501"
        assert raw.cmd(b"MAIL FROM:<x@outside.example> FOO=1")[:3] == b"555"
        assert raw.cmd(b"MAIL FROM:<x@outside.example> BODY=9BIT")[:3] == b"501"
        assert raw.cmd(b"MAIL FROM:<x@outside.example> SIZE=ten")[:3] == b"501"
        assert raw.cmd(b"MAIL FROM:<x@@outside..example")[:3] in (b"553", b"501")
        assert raw.cmd(b"MAIL FROM:<x@outside.example>")[:3] == b"250"
        assert raw.cmd(b"MAIL FROM:<y@outside.example>")[:3] == b"503"  # nested
        assert raw.cmd(b"RCPT TO:<" + A.encode() + b"> NOTIFY=NEVER")[:3] == b"555"
        assert raw.cmd(b"DATA")[:3] == b"503"  # no recipient
        assert raw.cmd(b"RCPT TO:<" + A.encode() + b">")[:3] == b"250"
        assert raw.cmd(b"DATA now")[:3] == b"501"
        assert raw.cmd(b"RSET")[:3] == b"250"
        assert raw.cmd(b"VRFY <a@corp.example>")[:3] == b"252"
        assert raw.cmd(b"EXPN staff")[:3] == b"502"
        assert raw.cmd(b"HELP")[:3] == b"250"
        for n in range(4):
            assert raw.cmd(b"BOGUS%d" % n)[:3] == b"500"
        assert raw.cmd(b"BOGUS")[:3] == b"502"  # the fifth: goodbye
        assert raw.stream.readline() == b""  # and closed


def test_over_long_lines_in_commands_and_in_data(fed: Fed, sink: FakeSystem) -> None:
    with Raw(fed.smtp_port) as raw:
        assert raw.cmd(b"EHLO t")[:3] == b"250"
        assert raw.cmd(b"NOOP " + b"n" * 1200)[:3] == b"500"
        raw.send(b"NOOP " + b"n" * 300_000)  # no line end for a long while: skipped
        assert raw.cmd(b"")[:3] == b"500"
        assert raw.cmd(b"NOOP")[:3] == b"250"  # the session goes on
        assert raw.cmd(b"MAIL FROM:<x@outside.example>")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<" + A.encode() + b">")[:3] == b"250"
        assert raw.cmd(b"DATA")[:3] == b"354"
        raw.send(b"Message-ID: <long@t>\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n")
        assert raw.reply().startswith(b"500 Line too long")
        # 999 octets and CRLF (1001: the limit) pass, even with the CR and LF in two writes.
        assert raw.cmd(b"MAIL FROM:<x@outside.example>")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<" + A.encode() + b">")[:3] == b"250"
        assert raw.cmd(b"DATA")[:3] == b"354"
        raw.send(b"Message-ID: <limit@t>\r\n\r\n" + b"y" * 999 + b"\r")
        raw.send(b"\n.\r\n")
        assert raw.reply().startswith(b"250 2.0.0")
    wait_for(lambda: delivered(sink, "limit@t") == 1, what="the 1001-octet line")
    assert delivered(sink, "long@t") == 0


def test_a_message_over_the_size_limit_is_refused_after_its_data(
        fed: Fed, sink: FakeSystem) -> None:
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        client.ehlo("t")
        assert client.esmtp_features["size"] == "20000"
        code, _ = client.mail("x@outside.example", ["SIZE=20001"])
        assert code == 552
        client.rset()
        big = message("big", "big@t", ("z" * 70 + "\r\n") * 400)  # ~29 KB
        assert client.mail("x@outside.example")[0] == 250  # no SIZE: found out at the end
        assert client.rcpt(A)[0] == 250
        assert client.data(big)[0] == 552
        client.sendmail("x@outside.example", [A], message("small", "small@t"))
    wait_for(lambda: delivered(sink, "small@t") == 1, what="the message after the big one")
    assert delivered(sink, "big@t") == 0


def test_a_client_vanishing_mid_data_leaves_nothing_behind(fed: Fed, sink: FakeSystem) -> None:
    before = len(queue_files(fed))
    for n in range(5):
        with Raw(fed.smtp_port) as raw:
            assert raw.cmd(b"EHLO t")[:3] == b"250"
            assert raw.cmd(b"MAIL FROM:<x@outside.example>")[:3] == b"250"
            assert raw.cmd(b"RCPT TO:<" + A.encode() + b">")[:3] == b"250"
            assert raw.cmd(b"DATA")[:3] == b"354"
            raw.send(b"Message-ID: <gone%d@t>\r\n\r\nhalf a mess" % n)
            if n % 2:  # a reset instead of a clean close
                raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        client.sendmail("x@outside.example", [A], message("after", "after@t"))
    wait_for(lambda: delivered(sink, "after@t") == 1, what="a message after the vanishing")
    assert not any(delivered(sink, f"gone{n}@t") for n in range(5))
    wait_for(lambda: len(queue_files(fed)) <= before, what="an empty queue")


def test_starttls_then_mail_over_tls(fed: Fed, sink: FakeSystem,
                                     tls_files: tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    context.check_hostname = False
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        client.ehlo("t")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        code, _ = client.mail("x@outside.example")
        assert code == 503  # RFC 3207 4.2: the session starts over, EHLO again
        client.ehlo("t")
        assert not client.has_extn("starttls")
        client.sendmail("x@outside.example", [A], message("tls", "tls@t"))
    got = wait_for(lambda: [m for m in sink.received if b"<tls@t>" in m.data],
                   what="the message sent over TLS")
    assert b"with ESMTPS id" in got[0].data


def test_a_broken_tls_handshake_closes_only_that_connection(fed: Fed, sink: FakeSystem
                                                            ) -> None:
    with Raw(fed.smtp_port) as raw:
        assert raw.cmd(b"EHLO t")[:3] == b"250"
        assert raw.cmd(b"STARTTLS")[:3] == b"220"
        raw.send(b"this is not a TLS client hello\r\n" * 10)
        leftover = raw.stream.read()  # returns only once fed closed it (else: timeout)
        assert b"250" not in leftover  # no SMTP in clear after the 220
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        client.sendmail("x@outside.example", [A], message("after tls", "aftertls@t"))
    wait_for(lambda: delivered(sink, "aftertls@t") == 1, what="a message after the bad one")


@pytest.mark.parametrize("arg", [
    "<a@b.c>", "<a@b.c> SIZE=100", "  <x.y+z@corp.example> BODY=8BITMIME", "<>", "a@b.c",
    "<a..b@c.d>", '<"q"@x.y>', "<a@[1.2.3.4]>", "<a@b.c>x", "<u@sub.dom-ain.example>  SMTPUTF8",
    "<.a@b.c>", "<a@b..c>", "<a@b.c.>", "<a@b.c> ", "<a@b.c>\tX=1", "<a_b@c_d.e>", "<a@b",
    "<a@b.c> <d@e.f>", "<@route:a@b.c>", "<a b@c.d>", "<j\u00f6@b.c>",
])
def test_the_quick_address_parser_agrees_with_aiosmtpd(arg: str) -> None:
    class Handler:
        pass

    theirs = SMTP(Handler())._getaddr(arg)
    ours = parse_address(arg)
    assert ours[0] == theirs[0]
    if theirs[0] is not None:
        assert ours[1] == theirs[1]
