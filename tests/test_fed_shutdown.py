"""fed's graceful shutdown: SIGTERM while a client is in the middle of DATA."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from fedraw import Raw
from fedutil import FakeSystem, Fed, message
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

A = "a@corp.example"


def refused(port: int) -> bool:
    """True once nothing listens on the SMTP port any more (shutdown has begun)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def test_sigterm_during_data_answers_the_client_and_keeps_the_spool(tmp_path: Path) -> None:
    s1 = FakeSystem("s1").start()
    fed = Fed(tmp_path / "fed", [s1]).start()
    try:
        fed.client.put_entry(A, s1.physical("a"))
        fed.client.hold([A])  # keep the message in the spool across the restart
        streaming, waiting = Raw(fed.smtp_port), Raw(fed.smtp_port)
        for raw in (streaming, waiting):
            assert raw.cmd(b"EHLO t")[:3] == b"250"
            assert raw.cmd(b"MAIL FROM:<s@outside.example>")[:3] == b"250"
            assert raw.cmd(b"RCPT TO:<a@corp.example>")[:3] == b"250"
        assert streaming.cmd(b"DATA")[:3] == b"354"
        data = message("in flight", "term@t")
        streaming.send(data[:40])

        assert fed.proc is not None
        fed.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(fed.smtp_port), what="the listener to close")

        # A new transaction is refused with 421: that client keeps its message.
        assert waiting.cmd(b"DATA").startswith(b"421 4.3.2")
        # The message already streaming is finished, spooled and acknowledged.
        streaming.send(data[40:] + b".\r\n")
        answer = streaming.reply()
        assert answer.startswith(b"250 2.0.0 Ok: queued as"), answer
        qid = answer.split()[-1].decode()
        assert streaming.reply().startswith(b"421 4.3.2")  # then told goodbye
        streaming.close()
        waiting.close()
        assert fed.proc.wait(30) == 0
        fed.proc = None
        assert (fed.state_dir / "spool" / "queue" / f"{qid}.eml").exists()

        fed.start()  # same state directory: the hold and the message survived
        assert fed.client.holds()[A].waiting == 1
        fed.client.release([A])
        wait_for(lambda: s1.ids() == ["<term@t>"], what="delivery after restart")
    finally:
        fed.kill()
        s1.stop()
