"""A hostile crowd against a real fed, while one honest client keeps sending mail.

Garbage, pipelining abuse, oversized lines and messages, every smuggling ending, NUL in
addresses and slow-loris connections hit fed at the same time as a well-behaved smtplib
client sends its mail. Afterwards fed must still be up, and every message fed
acknowledged (honest or not) must be at the sink, a real aiosmtpd server, exactly once;
no smuggled "second message" may exist on its own. Every loop and every wait is bounded.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedraw import Raw
from fedutil import FakeSystem, Fed, message
from helpers.mail import Sender
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

A = "a@corp.example"
HONEST = 25
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as \w+")
ENDINGS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


class Tally:
    """Acknowledged message ids, from every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: list[str] = []

    def add(self, msgid: str) -> None:
        with self.lock:
            self.acked.append(msgid)


@pytest.fixture
def sink() -> Iterator[FakeSystem]:
    system = FakeSystem("s1").start()
    yield system
    system.stop()


@pytest.fixture
def fed(tmp_path: Path, sink: FakeSystem) -> Iterator[Fed]:
    running = Fed(tmp_path / "fed", [sink], extra=[
        "--max-size", "200000", "--smtp-timeout", "2"]).start()
    running.client.put_entry(A, sink.physical("a"))
    yield running
    running.kill()


def garbage(port: int, tally: Tally) -> None:
    rng = random.Random(7)
    with Raw(port) as raw:
        for _ in range(40):
            line = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 300)))
            try:
                raw.send(line.replace(b"\n", b"") + b"\r\n")
                if not raw.reply():
                    return  # fed hung up (too many bogus commands): fine
            except OSError:
                return


def pipelining(port: int, tally: Tally) -> None:
    # A thousand NOOPs in one write: fed stops answering after its per-command budget.
    with Raw(port) as raw:
        raw.send(b"EHLO p\r\n" + b"NOOP\r\n" * 1000)
        replies = [raw.reply() for _ in range(80)]
        assert any(r.startswith(b"421 4.7.0 NOOP") for r in replies)
    # A whole transaction, message and the next commands in one write, without waiting
    # for any reply (DATA not last in its group): still one message, answered in order.
    for n in range(3):
        msgid = f"<piped-{n}@t>"
        body = message("piped", msgid.strip("<>"))
        with Raw(port) as raw:
            raw.send(b"EHLO p\r\nMAIL FROM:<p@outside.example>\r\nRCPT TO:<a@corp.example>\r\n"
                     b"DATA\r\n" + body + b".\r\nNOOP\r\nQUIT\r\n")
            replies = [raw.reply() for _ in range(6)]
            if QUEUED.match(replies[4]):
                tally.add(msgid)
            assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250",
                                                b"250"]


def oversized(port: int, tally: Tally) -> None:
    with Raw(port) as raw:
        assert raw.cmd(b"EHLO o")[:3] == b"250"
        assert raw.cmd(b"HELP " + b"x" * 1500)[:3] == b"500"
        assert raw.cmd(b"NOOP " + b"x" * (70 * 1024))[:3] == b"500"
        assert raw.cmd(b"MAIL FROM:<o@outside.example>")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<a@corp.example>")[:3] == b"250"
        assert raw.cmd(b"DATA")[:3] == b"354"
        raw.send(b"Subject: huge line\r\n\r\n" + b"y" * (70 * 1024) + b"\r\n.\r\n")
        assert raw.reply()[:3] == b"500"
        assert raw.cmd(b"MAIL FROM:<o@outside.example>")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<a@corp.example>")[:3] == b"250"
        assert raw.cmd(b"DATA")[:3] == b"354"
        raw.send(b"Subject: huge\r\nMessage-ID: <huge@t>\r\n\r\n" + (b"z" * 998 + b"\r\n") * 300
                 + b".\r\n")
        assert raw.reply()[:3] == b"552"
        assert raw.cmd(b"QUIT")[:3] == b"221"


def smuggler(port: int, tally: Tally) -> None:
    for n, ending in enumerate(ENDINGS):
        with Raw(port) as raw:
            raw.send(b"EHLO s\r\n")
            raw.reply()
            assert raw.cmd(b"MAIL FROM:<s@outside.example>")[:3] == b"250"
            assert raw.cmd(b"RCPT TO:<a@corp.example>")[:3] == b"250"
            assert raw.cmd(b"DATA")[:3] == b"354"
            raw.send(b"Message-ID: <outer-%d@t>\r\n\r\nhi" % n + ending
                     + b"MAIL FROM:<evil@outside.example>\r\nRCPT TO:<a@corp.example>\r\n"
                     b"DATA\r\nMessage-ID: <smuggled-%d@t>\r\n\r\nevil\r\n.\r\n" % n)
            answer = raw.reply()
            assert QUEUED.match(answer), answer
            tally.add(f"<outer-{n}@t>")
            assert raw.cmd(b"QUIT")[:3] == b"221"  # nothing smuggled got a reply


def nul(port: int, tally: Tally) -> None:
    with Raw(port) as raw:
        assert raw.cmd(b"EHLO n")[:3] == b"250"
        assert raw.cmd(b"MAIL FROM:<n\x00@outside.example>")[:3] == b"553"
        assert raw.cmd(b"MAIL FROM:<n@outside.example>")[:3] == b"250"
        assert raw.cmd(b"RCPT TO:<a@corp.example\x00.evil.example>")[:3] == b"553"
        assert raw.cmd(b"RCPT TO:<a\x00@corp.example>")[:3] == b"553"
        assert raw.cmd(b"DATA")[:3] == b"503"


def slow_loris(port: int, tally: Tally) -> None:
    closed = 0
    for _ in range(2):
        with Raw(port) as raw:
            for byte in b"EHLO " + b"l" * 80:  # at most 8.5 s; fed's timeout is 2 s
                try:
                    raw.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.1)
            try:
                closed += raw.reply().startswith(b"421 4.4.2") or raw.stream.readline() == b""
            except OSError:
                closed += 1
    assert closed == 2


def test_hostile_crowd(fed: Fed, sink: FakeSystem) -> None:
    tally = Tally()
    attacks: list[Callable[[int, Tally], None]] = [
        garbage, garbage, pipelining, oversized, smuggler, nul, *[slow_loris] * 20]
    honest = Sender(fed.smtp_port, [A], tag="honest-", count=HONEST, pause=0, seconds=90,
                    sender="friend@outside.example", timeout=30)
    with ThreadPoolExecutor(max_workers=len(attacks)) as pool:
        honest.start()
        futures = [pool.submit(attack, fed.smtp_port, tally) for attack in attacks]
        for future in futures:
            future.result(timeout=90)  # re-raises any failed assertion
    honest.join(90)  # all sent (finish() would stop it)
    honest_ids = honest.finish()
    assert honest.refused == []  # the honest client got every message through, in order
    assert honest_ids == [f"<honest-{n}@outside.example>" for n in range(HONEST)]
    tally.acked += honest_ids

    assert fed.proc is not None and fed.proc.poll() is None
    assert fed.client.health()["ok"] is True
    wait_for(lambda: len(sink.received) >= len(tally.acked), timeout=60,
             what="every acknowledged message at the sink")
    wait_for(lambda: fed.client.queue().pending == 0, what="an empty queue")
    ids = sink.ids()
    assert sorted(ids) == sorted(tally.acked)  # each exactly once, nothing extra
    assert not [i for i in ids if "smuggled" in i]
