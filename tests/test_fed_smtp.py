"""fed's SMTP face: acceptance policy, durable acknowledgement, hostile clients."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedutil import FakeSystem, Fed, message, queue_id, send, wait_for

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
    queue_dir.rmdir()
    queue_dir.write_text("not a directory")  # the rename into the queue now fails
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
