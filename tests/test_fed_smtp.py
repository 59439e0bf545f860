"""fed's SMTP face: acceptance policy, durable acknowledgement, hostile clients."""

from __future__ import annotations

import shutil
import smtplib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedraw import Raw, Utf8System
from fedutil import FakeSystem, Fed, message, queue_id, send
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def s1() -> Iterator[FakeSystem]:
    system = FakeSystem("s1").start()
    yield system
    system.stop()


@pytest.fixture
def fed(tmp_path: Path, s1: FakeSystem) -> Iterator[Fed]:
    running = Fed(tmp_path / "fed", [s1], extra=["--max-size", "20000"]).start()
    running.client.put_entry("a@corp.example", s1.physical("a=corp.example"))
    yield running
    running.kill()


def test_250_only_once_the_message_is_in_the_spool(fed: Fed, s1: FakeSystem) -> None:
    fed.client.hold(["a@corp.example"])  # keep it in the spool so we can look at it
    code, reply = send(fed.smtp_port, ["a@corp.example"], message("spooled", "m1@t"))
    assert code == 250 and "queued as" in reply
    qid = queue_id(reply)
    spooled = (fed.state_dir / "spool" / "queue" / f"{qid}.eml").read_bytes()
    assert b"Message-ID: <m1@t>" in spooled
    assert spooled.startswith(b"Received: from tester.example") and qid.encode() in spooled
    assert fed.client.holds()["a@corp.example"].waiting == 1


def test_no_250_when_the_spool_cannot_take_the_message(fed: Fed) -> None:
    queue_dir = fed.state_dir / "spool" / "queue"
    # Moved away first, then removed: fed's background refill keeps making blanks
    # (fed/queue/blanks.py) by path, so an rmtree in place raced it ("Directory not
    # empty"); after the rename nothing can be made in the moved folder.
    moved = queue_dir.with_name("queue.gone")
    queue_dir.rename(moved)
    queue_dir.write_text("not a directory")  # no new file can be made there either
    shutil.rmtree(moved)  # its blanks too: their names are gone
    code, reply = send(fed.smtp_port, ["a@corp.example"], message("lost?", "m2@t"))
    assert code == 451, reply
    queue_dir.unlink()
    queue_dir.mkdir()
    code, reply = send(fed.smtp_port, ["a@corp.example"], message("kept", "m3@t"))
    assert code == 250, reply


def test_recipient_policy(fed: Fed, s1: FakeSystem) -> None:
    code, reply = send(fed.smtp_port, ["victim@elsewhere.example"], b"x\r\n")
    assert (code, reply) == (550, "5.7.1 <victim@elsewhere.example>: relaying denied")
    code, reply = send(fed.smtp_port, ["Nobody@Corp.Example"], b"x\r\n")
    assert (code, reply) == (550, "5.1.1 <nobody@corp.example>: user unknown in directory")
    code, reply = send(fed.smtp_port, ["x@nosuchsystem.invalid"], b"x\r\n")
    assert code == 550
    code, _ = send(fed.smtp_port, [s1.physical("direct")], message("direct", "m4@t"))
    assert code == 250
    wait_for(lambda: s1.ids() == ["<m4@t>"], what="direct physical delivery")


def test_delivers_to_the_physical_address_the_directory_names(fed: Fed, s1: FakeSystem
                                                              ) -> None:
    code, _ = send(fed.smtp_port, ["A@Corp.Example"], message("hi", "m5@t"),
                   mail_from="Boss@Outside.example")
    assert code == 250
    got = wait_for(lambda: list(s1.received), what="delivery")[0]
    assert got.rcpts == ["a=corp.example@s1.invalid"]
    assert got.mail_from == "Boss@Outside.example"
    assert b"by fed.invalid (mailferry fed)" in got.data
    rows = fed.client.deliveries(rcpt="a@corp.example")
    assert [(r.result, r.system, r.message_id) for r in rows] == [("delivered", "s1", "<m5@t>")]


def test_too_many_recipients_and_oversize(fed: Fed) -> None:
    code, reply = send(fed.smtp_port, ["a@corp.example"] * 101, b"x\r\n")
    assert (code, reply) == (452, "4.5.3 too many recipients")
    code, reply = send(fed.smtp_port, ["a@corp.example"], (b"X" * 900 + b"\r\n") * 30)
    assert code == 552, reply


def test_smuggling_is_not_split_into_two_messages(fed: Fed, s1: FakeSystem) -> None:
    smuggled = (b"Subject: first\r\nMessage-ID: <outer@t>\r\n\r\nbody\n.\n"
                b"MAIL FROM:<evil@outside.example>\r\nRCPT TO:<a@corp.example>\r\nDATA\r\n"
                b"Message-ID: <smuggled@t>\r\n\r\nsmuggled\r\n.\r\n")
    with socket.create_connection(("127.0.0.1", fed.smtp_port), timeout=10) as sock:
        stream = sock.makefile("rb")
        replies: list[bytes] = [stream.readline()]
        for command in (b"EHLO t\r\n", b"MAIL FROM:<s@outside.example>\r\n",
                        b"RCPT TO:<a@corp.example>\r\n", b"DATA\r\n"):
            sock.sendall(command)
            line = stream.readline()
            while line[3:4] == b"-":
                line = stream.readline()
            replies.append(line)
        sock.sendall(smuggled)
        replies.append(stream.readline())
        sock.sendall(b"QUIT\r\n")
        replies.append(stream.readline())
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    got = wait_for(lambda: list(s1.received), what="delivery")
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    assert len(s1.received) == 1
    assert b"\r\n.\r\nMAIL FROM:<evil@outside.example>" in got[0].data  # one message, CRLFs
    assert fed.client.deliveries() and len(fed.client.deliveries()) == 1


def test_wrong_token_is_refused(fed: Fed) -> None:
    from reconciler.errors import PermanentError
    from reconciler.fedclient import FedClient

    bad = FedClient(f"http://127.0.0.1:{fed.control_port}", "wrong-" + uuid.uuid4().hex)
    with pytest.raises(PermanentError, match="refused the token"):
        bad.directory()
    with pytest.raises(PermanentError, match="refused the token"):
        bad.hold(["a@corp.example"])
    assert fed.client.holds() == {}


# -- hostile input ---------------------------------------------------------------------

def test_nul_control_and_8bit_bytes_in_addresses_are_refused(fed: Fed, s1: FakeSystem) -> None:
    with Raw(fed.smtp_port) as raw:
        assert raw.cmd(b"EHLO evil\x00host")[:3] == b"501"
        assert raw.cmd(b"HELO evil\x00host")[:3] == b"501"
        assert raw.cmd(b"EHLO t")[:3] == b"250"
        assert raw.cmd(b"MAIL FROM:<a\x00b@outside.example>")[:7] == b"553 5.1"
        assert raw.cmd(b"MAIL FROM:<a\x01b@outside.example>")[:7] == b"553 5.1"
        assert raw.cmd(b"MAIL FROM:<j\xc3\xb6@outside.example>")[:9] == b"553 5.6.7"
        assert raw.cmd(b"MAIL FROM:<s@outside.example>")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<a\x00@corp.example>")[:7] == b"553 5.1"
        assert raw.cmd(b"RCPT TO:<a@corp.example\x00>")[:7] == b"553 5.1"
        assert raw.cmd(b"RCPT TO:<a\x00b@elsewhere.example>")[:7] == b"553 5.1"
        assert raw.cmd(b"RCPT TO:<\xc3\xa4@corp.example>")[:9] == b"553 5.6.7"
        assert raw.cmd(b"DATA")[:3] == b"503"  # nothing was accepted
        assert raw.cmd(b"RSET")[:3] == b"250"
        # Even with SMTPUTF8, bytes that are not UTF-8 are no address.
        assert raw.cmd(b"MAIL FROM:<s\xff@outside.example> SMTPUTF8")[:7] == b"553 5.1"
        assert raw.cmd(b"MAIL FROM:<s@outside.example> SMTPUTF8")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<a\xff@corp.example>")[:7] == b"553 5.1"
        assert raw.cmd(b"QUIT")[:3] == b"221"
    assert fed.client.queue().pending == 0


def test_8bitmime_and_smtputf8_are_advertised_and_honoured(tmp_path: Path) -> None:
    sink = Utf8System("u8", protocol="smtp").start()
    running = Fed(tmp_path / "fed", [sink]).start()
    try:
        running.client.put_entry("jösé@corp.example", sink.physical("jose"))
        body = ("Subject: caf\u00e9\r\nMessage-ID: <u8@t>\r\n\r\n"
                "d\u00e9j\u00e0 vu \u2014 \u00fcml\u00e4ut\r\n").encode()
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=20) as client:
            client.ehlo("t")
            assert client.has_extn("8bitmime") and client.has_extn("smtputf8")
            refused = client.sendmail("m\u00e9@ex\u00e4mple.example",
                                      ["J\u00d6S\u00c9@corp.example"], body,
                                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            assert refused == {}
        got = wait_for(lambda: list(sink.received), what="delivery")[0]
        assert got.mail_from == "m\u00e9@ex\u00e4mple.example"
        assert got.rcpts == ["jose@u8.invalid"]
        assert got.data.endswith(body)  # 8-bit bytes passed on unchanged
    finally:
        running.kill()
        sink.stop()


SMUGGLE_ENDINGS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r",
                   b"\n.\r", b"\r\n\x00.\r\n"]


def smuggle(port: int, n: int, ending: bytes) -> list[bytes]:
    """One DATA carrying a would-be second message after `ending`; the replies seen."""
    payload = (b"Subject: outer\r\nMessage-ID: <outer-%d@t>\r\n\r\nbody" % n + ending
               + b"MAIL FROM:<evil@outside.example>\r\nRCPT TO:<a@corp.example>\r\nDATA\r\n"
               b"Message-ID: <smuggled-%d@t>\r\n\r\nsmuggled\r\n.\r\n" % n)
    with Raw(port) as raw:
        replies = [raw.cmd(b"EHLO t"), raw.cmd(b"MAIL FROM:<s@outside.example>"),
                   raw.cmd(b"RCPT TO:<a@corp.example>"), raw.cmd(b"DATA")]
        raw.send(payload)
        replies.append(raw.reply())
        replies.append(raw.cmd(b"QUIT"))
    return replies


def test_every_smuggling_variant_stays_one_message(fed: Fed, s1: FakeSystem) -> None:
    for n, ending in enumerate(SMUGGLE_ENDINGS):
        replies = smuggle(fed.smtp_port, n, ending)
        # Exactly one answer to the one DATA, then QUIT: no reply to a smuggled command.
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"], \
            (ending, replies)
    wait_for(lambda: len(s1.received) == len(SMUGGLE_ENDINGS), what="all deliveries")
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    assert sorted(s1.ids()) == sorted(f"<outer-{n}@t>" for n in range(len(SMUGGLE_ENDINGS)))
    for got in s1.received:
        head, _, body = got.data.partition(b"\r\n\r\n")
        assert b"smuggled" not in head and b"smuggled" in body
        # Normalised: only CRLF line ends leave fed.
        assert b"\r" not in got.data.replace(b"\r\n", b"")
        assert b"\n" not in got.data.replace(b"\r\n", b"")


def test_bare_newline_reject_mode(tmp_path: Path, s1: FakeSystem) -> None:
    running = Fed(tmp_path / "fed", [s1], extra=["--bare-newline", "reject"]).start()
    try:
        running.client.put_entry("a@corp.example", s1.physical("a"))
        for n, ending in enumerate(SMUGGLE_ENDINGS[:7]):
            replies = smuggle(running.smtp_port, n, ending)
            assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"550", b"221"]
            assert replies[4].startswith(b"550 5.5.2")
        code, _ = send(running.smtp_port, ["a@corp.example"], message("clean", "clean@t"))
        assert code == 250  # CRLF-only mail still passes
        wait_for(lambda: s1.ids() == ["<clean@t>"], what="the clean message")
        # s1 has it before fed records the delivery: wait for the record, not just the mail.
        wait_for(lambda: running.client.queue().pending == 0, what="the delivery recorded")
        assert len(s1.received) == 1
    finally:
        running.kill()


def test_size_declared_too_big_and_long_lines(fed: Fed) -> None:
    with Raw(fed.smtp_port) as raw:
        assert raw.cmd(b"EHLO t")[:3] == b"250"
        assert raw.cmd(b"MAIL FROM:<s@outside.example> SIZE=20001")[:3] == b"552"
        assert raw.cmd(b"MAIL FROM:<" + b"x" * 1100 + b"@outside.example>")[:3] == b"500"
        assert raw.cmd(b"NOOP " + b"y" * 70000)[:3] == b"500"
        assert raw.cmd(b"MAIL FROM:<s@outside.example> SIZE=100")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<a@corp.example>")[:3] == b"250"
        assert raw.cmd(b"DATA")[:3] == b"354"
        raw.send(b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\n.\r\n")
        assert raw.reply()[:3] == b"500"  # RFC 5321 4.5.3.1.6: 1000 octets a line
        assert raw.cmd(b"NOOP")[:3] == b"250"  # the session goes on
    assert fed.client.queue().pending == 0


def test_idle_and_trickling_clients_are_timed_out(tmp_path: Path, s1: FakeSystem) -> None:
    running = Fed(tmp_path / "fed", [s1], extra=["--smtp-timeout", "1.5"]).start()
    try:
        running.client.put_entry("a@corp.example", s1.physical("a"))
        with Raw(running.smtp_port) as idle:
            assert idle.reply().startswith(b"421 4.4.2")  # nothing sent: told, then closed
            assert idle.stream.readline() == b""
        with Raw(running.smtp_port) as loris:  # a byte at a time never completes a line
            closed = False
            for byte in b"EHLO slow.loris.example" * 4:
                try:
                    loris.send(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
            assert closed or loris.reply().startswith(b"421 4.4.2")
        # DATA is different: each chunk restarts the timeout, so a slow but steady
        # sender of a big message gets through.
        with Raw(running.smtp_port) as slow:
            assert slow.cmd(b"EHLO t")[:3] == b"250"
            assert slow.cmd(b"MAIL FROM:<s@outside.example>")[:3] == b"250"
            assert slow.cmd(b"RCPT TO:<a@corp.example>")[:3] == b"250"
            assert slow.cmd(b"DATA")[:3] == b"354"
            slow.send(b"Subject: slow\r\nMessage-ID: <slow@t>\r\n\r\n")
            for n in range(12):  # 12 x 0.3 s, longer than the 1.5 s timeout in total
                slow.send(b"line %d\r\n" % n)
                time.sleep(0.3)
            slow.send(b".\r\n")
            assert slow.reply()[:3] == b"250"
        wait_for(lambda: s1.ids() == ["<slow@t>"], what="the slow message")
    finally:
        running.kill()


def test_connection_limits(tmp_path: Path, s1: FakeSystem) -> None:
    running = Fed(tmp_path / "fed", [s1], extra=["--max-connections", "3"]).start()
    try:
        held = [Raw(running.smtp_port) for _ in range(3)]
        assert all(r.greeting[:3] == b"220" for r in held)
        with Raw(running.smtp_port) as extra:
            assert extra.greeting.startswith(b"421 4.7.0 too many connections")
        held.pop().close()

        def admitted() -> bool:
            with Raw(running.smtp_port) as again:
                return again.greeting[:3] == b"220"

        wait_for(admitted, what="a freed slot")
        for r in held:
            r.close()
    finally:
        running.kill()
    # Per client address, outside the relay networks (loopback is not one here).
    running = Fed(tmp_path / "fed2", [s1], extra=["--max-connections-per-ip", "2",
                                                  "--relay-network", "10.0.0.0/8"]).start()
    try:
        held = [Raw(running.smtp_port) for _ in range(2)]
        with Raw(running.smtp_port) as extra:
            assert extra.greeting.startswith(b"421 4.7.0 too many connections from your")
        for r in held:
            r.close()
    finally:
        running.kill()
