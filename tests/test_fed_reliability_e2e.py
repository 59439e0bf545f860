"""fed's reliability fixes on the wire (issue 14): a real fed, real sockets.

- a queue file corrupted on disk is never relayed: delivery finds the checksum wrong and
  quarantines it; ``fed queue quarantine`` lists it, ``/metrics`` counts it, ``fed queue
  requeue`` puts it back once it checks out;
- an LMTP server that drops the link in the middle of its per-recipient replies: the
  recipients already answered 250 are done (not delivered twice), only the rest retried.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedutil import TOKEN, FakeSystem, Fed, fed_queue, message, queue_id, send
from helpers.waiting import wait_for
from sysutil import free_port

pytestmark = pytest.mark.timeout(90)

A = "a@corp.example"




def metric(fed: Fed, name: str, labels: dict[str, str] | None = None) -> float:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{fed.control_port}/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
def s1() -> Iterator[FakeSystem]:
    system = FakeSystem("s1").start()
    yield system
    system.stop()


def test_a_corrupted_queue_file_is_quarantined_not_relayed(tmp_path: Path,
                                                           s1: FakeSystem) -> None:
    fed = Fed(tmp_path / "fed", [s1]).start()
    try:
        fed.client.put_entry(A, s1.physical("a"))
        fed.client.hold([A])  # queued, not delivered: the file is on disk with its rows
        code, reply = send(fed.smtp_port, [A], message("rot", "rot@t", body="original"))
        assert code == 250
        qid = queue_id(reply)
        assert fed.stop() == 0  # restart: delivery must read the file (no memory copy)
        file = fed.state_dir / "spool" / "queue" / f"{qid}.eml"
        good = file.read_bytes()
        file.write_bytes(good.replace(b"original", b"0riginal"))  # one bit of rot
        fed.start()
        fed.client.release([A])
        wait_for(lambda: fed.client.deliveries(rcpt=A)
                 and fed.client.deliveries(rcpt=A)[-1].result == "quarantined",
                 what="the quarantine logged")
        assert s1.received == []  # the corrupted bytes never left
        assert not file.exists()
        assert fed.client.queue().pending == 0
        listed = fed_queue(fed, "quarantine", timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert qid in listed.stdout and "checksum mismatch" in listed.stdout
        assert A in listed.stdout  # the recipient still owed the message
        assert metric(fed, "fed_quarantined_total", {"where": "delivery"}) == 1
        assert metric(fed, "fed_quarantine_messages") == 1

        # Still corrupt: requeue refuses (exit 1) and leaves it in quarantine.
        refused = fed_queue(fed, "requeue", qid, timeout=30)
        assert refused.returncode == 1 and "still fails its check" in refused.stderr
        # The admin restored the file from a backup: it checks out and is delivered.
        (fed.state_dir / "spool" / "quarantine" / f"{qid}.eml").write_bytes(good)
        requeued = fed_queue(fed, "requeue", qid, timeout=30)
        assert requeued.returncode == 0, requeued.stderr
        assert f"{qid}: requeued for 1 recipients" in requeued.stdout
        wait_for(lambda: s1.ids() == ["<rot@t>"], what="delivery after requeue")
        assert b"original" in s1.received[0].data
        assert "Quarantine is empty" in fed_queue(fed, "quarantine", timeout=30).stdout
    finally:
        fed.kill()


@dataclass
class BreakingLMTP:
    """An LMTP server on loopback that, on its first connection, answers the first
    recipient's final reply with 250 and then drops the link; afterwards it answers
    250 for everyone. It records which recipients each DATA reached (and was answered)."""

    port: int = 0
    delivered: list[list[str]] = field(default_factory=list)  # per DATA: rcpts answered 250
    connections: int = 0
    _sock: socket.socket | None = None

    def start(self) -> BreakingLMTP:
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()  # type: ignore[union-attr]
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    self._session(conn, breaking=self.connections == 1)

    def _session(self, conn: socket.socket, breaking: bool) -> None:
        stream = conn.makefile("rb")
        conn.sendall(b"220 breaking LMTP\r\n")
        rcpts: list[str] = []
        for _ in range(1000):  # bounded session
            line = stream.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"LHLO":
                conn.sendall(b"250-breaking\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                rcpts = []
                conn.sendall(b"250 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                conn.sendall(b"250 ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                for _ in range(100_000):
                    if stream.readline() in (b".\r\n", b""):
                        break
                if breaking:
                    self.delivered.append(rcpts[:1])
                    conn.sendall(f"250 2.0.0 <{rcpts[0]}> delivered\r\n".encode())
                    conn.shutdown(socket.SHUT_RDWR)  # ... and the link breaks
                    return
                self.delivered.append(list(rcpts))
                conn.sendall(b"".join(f"250 2.0.0 <{r}> delivered\r\n".encode()
                                      for r in rcpts))
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")


def test_a_broken_lmtp_link_keeps_the_replies_already_received(tmp_path: Path) -> None:
    server = BreakingLMTP().start()
    fed = Fed(tmp_path / "fed", [], extra=["--system", f"s1=127.0.0.1:{server.port}/lmtp"])
    fed.start()
    try:
        rcpts = ["a@corp.example", "b@corp.example", "c@corp.example"]
        for rcpt in rcpts:
            fed.client.put_entry(rcpt, f"{rcpt.split('@')[0]}@s1.invalid")
        assert send(fed.smtp_port, rcpts, message("three", "three@t"))[0] == 250
        wait_for(lambda: fed.client.queue().pending == 0, timeout=20, what="all delivered")
        taken = [r for d in server.delivered for r in d]
        # a got its 250 before the break: delivered once; b and c once, on the retry.
        assert sorted(taken) == ["a@s1.invalid", "b@s1.invalid", "c@s1.invalid"], taken
        results = {d.rcpt: d.result for d in fed.client.deliveries()
                   if d.result == "delivered"}
        assert sorted(results) == rcpts
        deferred = [d.rcpt for d in fed.client.deliveries() if d.result == "deferred"]
        assert sorted(deferred) == ["b@corp.example", "c@corp.example"]
    finally:
        fed.kill()
        server.stop()
