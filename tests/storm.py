"""A kill -9 storm: concurrent senders, repeated SIGKILL of the whole server, exact counts.

Used by tests/test_fed_storm.py (fed, small) and bench/kill_storm.py (fed and Postfix, the
same storm). The server under test is anything with ``start()`` (returns once it accepts
SMTP on ``port``), ``kill()`` (SIGKILL of its whole process group) and ``idle()`` (its
queue is empty). Every message has its own Message-ID; a sender that loses its
connection moves on to the next message (the unanswered one may or may not arrive: it is
neither lost nor a duplicate, it was never acknowledged). After the storm and the drain:

- lost: acknowledged Message-IDs the sink never got (must be 0, invariant 1);
- duplicates: copies beyond the first, over every Message-ID the sink got.

Every loop is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedutil import Fed
from helpers import mail


class Server(Protocol):
    port: int

    def start(self) -> None: ...

    def kill(self) -> None: ...

    def idle(self) -> bool: ...


@dataclass
class StormResult:
    """What a storm did."""

    acked: int
    received: int  # distinct Message-IDs at the sink
    lost: int
    duplicates: int
    kills: int
    seconds: float

    @property
    def duplicate_percent(self) -> float:
        return 100.0 * self.duplicates / max(1, self.acked)

    def line(self, name: str) -> str:
        return (f"{name:8} acked {self.acked:6}  received {self.received:6}  lost "
                f"{self.lost}  duplicates {self.duplicates:4} ({self.duplicate_percent:.2f} "
                f"% of acked)  {self.kills} kills in {self.seconds:.1f} s")


def storm_message(msgid: str) -> bytes:
    return mail.message("storm", msgid, "kill -9 storm", sender="storm@outside.example",
                        to="b@example.test")


def storm(server: Server, sink_ids: Callable[[], list[str]], rcpt: str, *, messages: int,
          senders: int, kills: int, mail_from: str = "storm@outside.example",
          timeout: float = 600.0) -> StormResult:
    """Send `messages` with `senders` threads while killing the server `kills` times,
    evenly over the run; then wait for the queue to drain and count."""
    started = time.monotonic()
    deadline = started + timeout
    acked: list[str] = []
    lock = threading.Lock()
    ids = iter(range(messages))
    up = threading.Event()
    up.set()

    def next_id() -> int | None:
        with lock:
            return next(ids, None)

    def sender(k: int) -> None:
        n = next_id()
        while n is not None and time.monotonic() < deadline:
            if not up.wait(60):
                return
            try:
                client = smtplib.SMTP("127.0.0.1", server.port, timeout=20)
            except OSError:  # down (being restarted): this message was not sent yet
                time.sleep(0.05)
                continue
            try:
                client.ehlo("storm.example")
                while n is not None:
                    msgid = f"s{n}@storm"
                    try:
                        client.sendmail(mail_from, [rcpt], storm_message(msgid))
                    except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused):
                        n = next_id()  # refused with a reply: not acknowledged
                        continue
                    with lock:
                        acked.append(f"<{msgid}>")
                    n = next_id()
            except (OSError, smtplib.SMTPException):
                n = next_id()  # the link broke mid-transaction: never acknowledged
                time.sleep(0.05)
            finally:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    client.close()

    threads = [threading.Thread(target=sender, args=(k,), daemon=True)
               for k in range(senders)]
    for thread in threads:
        thread.start()
    done = 0
    for k in range(kills):
        target = messages * (k + 1) // (kills + 1)
        while len(acked) < target and time.monotonic() < deadline \
                and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        up.clear()
        server.kill()
        done += 1
        server.start()
        up.set()
    for thread in threads:
        thread.join(max(1.0, deadline - time.monotonic()))
    with lock:
        promised = set(acked)
    while time.monotonic() < deadline:
        got = set(sink_ids())
        if promised <= got and server.idle():
            break
        time.sleep(0.2)
    counts = Counter(sink_ids())
    return StormResult(
        acked=len(promised), received=len(counts), lost=len(promised - set(counts)),
        duplicates=sum(n - 1 for n in counts.values() if n > 1), kills=done,
        seconds=time.monotonic() - started)


class FedStormServer:
    """fed (one process, tests/fedutil.py's Fed) as the server of a storm: SIGKILL, then
    a restart on the same state folder (a new port each time, read by every connect)."""

    def __init__(self, fed: Fed) -> None:
        self.fed = fed
        self.port = 0

    def start(self) -> None:
        self.fed.start()
        self.port = self.fed.smtp_port

    def kill(self) -> None:
        self.fed.kill()

    def idle(self) -> bool:
        try:
            return self.fed.client.queue().pending == 0
        except Exception:  # restarting
            return False
