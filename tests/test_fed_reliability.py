"""fed's reliability fixes, each from a review finding (issue 14), in-process.

Start-up never deletes a file it merely could not read (quarantine), rows of a finished
message outlive its file, a recipient gets exactly one outcome when recording one raises,
and retries back off with jitter. The end-to-end halves (a corrupted file is never relayed,
LMTP replies survive a broken link) are in test_fed_reliability_e2e.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from fed.delivery.scheduler import Deliverer, DeliverySettings, Destination, Job
from fed.delivery.smtpclient import Reply
from fed.queue import spool as spool_mod
from fed.queue.blanks import Blanks
from fed.queue.queuefile import BadQueueFile, read_envelope
from fed.queue.spool import PendingRecipient, QuarantineError, Spool
from fed.queue.store import Store
from fed.routing.directory import System
from fed.telemetry import metrics
from mailferry.mail.backoff import backoff

BODY = b"Subject: a\r\nMessage-ID: <a@t>\r\n\r\nbody a\r\n"


def quarantined_count(where: str) -> float:
    value = metrics.REGISTRY.get_sample_value("fed_quarantined_total", {"where": where})
    return value or 0.0


def accept(root: Path, messages: dict[str, list[str]]) -> None:
    """Accept messages (queue id -> recipients) durably, as the SMTP handler would."""
    async def run() -> None:
        spool = Spool(root / "spool", Store(root / "fed.db"))
        spool.start()
        await asyncio.gather(*(spool.accept(qid, "s@x.example", rcpts, BODY, "<a@t>")
                               for qid, rcpts in messages.items()))
        await spool.close()
        spool.store.close()

    asyncio.run(run())


def lose_rows(root: Path, queue_id: str) -> Store:
    """A crash lost the index rows of an acknowledged message (its file was synced)."""
    store = Store(root / "fed.db")
    with store.transaction() as db:
        db.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
        db.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
    return store


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO, errno.EACCES])
def test_start_up_quarantines_a_file_it_cannot_read(tmp_path: Path, code: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    accept(tmp_path, {"A": ["a@corp.example"], "B": ["b@corp.example"]})
    store = lose_rows(tmp_path, "A")
    real_open = os.open

    def failing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("A.eml"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    before = quarantined_count("start-up")
    monkeypatch.setattr(os, "open", failing_open)  # what queuefile opens with
    spool = Spool(tmp_path / "spool", store)
    assert spool.recover() == 1  # B; A is not queued, but not gone either
    monkeypatch.undo()
    assert (spool.quarantine_dir / "A.eml").read_bytes().startswith(BODY)
    [info] = spool.quarantined()
    assert info["queue_id"] == "A" and os.strerror(code) in str(info["reason"])
    assert quarantined_count("start-up") == before + 1

    # The admin fixed the cause: requeue checks the file and queues all its recipients.
    queued: list[PendingRecipient] = []
    spool.on_queued = queued.extend
    assert asyncio.run(spool.requeue("A")) == 1
    assert [(p.queue_id, p.rcpt) for p in queued] == [("A", "a@corp.example")]
    assert sorted((p.queue_id, p.rcpt) for p in spool.pending()) == [
        ("A", "a@corp.example"), ("B", "b@corp.example")]
    assert spool.quarantined() == [] and spool.path("A").exists()
    with pytest.raises(QuarantineError, match="not in quarantine"):
        asyncio.run(spool.requeue("A"))


def _rewrite(file: Path, envelope_json: bytes) -> None:
    """A complete file (right sizes, right checksum) around another envelope."""
    crc = zlib.crc32(envelope_json, zlib.crc32(BODY))
    file.write_bytes(BODY + envelope_json + b"\nFED1 %016x %08x %08x\n"
                     % (len(BODY), len(envelope_json), crc))


def test_start_up_quarantines_complete_files_that_make_no_sense(tmp_path: Path) -> None:
    accept(tmp_path, {"A": ["a@corp.example"], "B": ["b@corp.example"]})
    store = lose_rows(tmp_path, "A")
    lose_rows(tmp_path, "B").close()
    queue = tmp_path / "spool" / "queue"
    good = json.loads((queue / "A.eml").read_bytes()[len(BODY):].split(b"\nFED1 ")[0])
    _rewrite(queue / "A.eml", b'{"queue_id": "A", "mail_from": 7')  # checksum fine, no JSON
    _rewrite(queue / "B.eml", json.dumps({**good, "queue_id": "Z"}).encode())  # not B
    with pytest.raises(BadQueueFile) as caught:
        read_envelope(queue / "A.eml")
    assert not caught.value.torn

    spool = Spool(tmp_path / "spool", store)
    assert spool.recover() == 0
    reasons = {str(i["queue_id"]): str(i["reason"]) for i in spool.quarantined()}
    assert sorted(reasons) == ["A", "B"]
    assert "does not parse" in reasons["A"] and "names queue id Z" in reasons["B"]
    with pytest.raises(QuarantineError, match="still fails its check"):
        asyncio.run(spool.requeue("A"))
    assert (spool.quarantine_dir / "A.eml").exists()  # a refused requeue moves nothing


def test_rows_of_a_finished_message_go_only_after_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the two must leave rows without a file (dropped at start), never
    the file without rows (start-up would rebuild it and deliver it again)."""
    accept(tmp_path, {"A": ["a@corp.example"]})
    gate = threading.Event()
    real_remove = Blanks.remove

    def slow_remove(files: list[Path]) -> None:
        gate.wait(10)  # the file's removal is slow (a busy disk): the rows must wait for it
        real_remove(files)

    # A's file is smaller than a blank (not one): it is unlinked in a thread, not reused.
    monkeypatch.setattr(Blanks, "remove", staticmethod(slow_remove))

    async def run() -> None:
        spool = Spool(tmp_path / "spool", Store(tmp_path / "fed.db"))
        spool.start()
        spool.mark_done("A", "a@corp.example")
        spool.forget("A")
        spool.write_outcomes()
        for _ in range(20):  # several flush rounds while the unlink hangs
            await asyncio.sleep(spool_mod.FLUSH_DELAY)
            spool.write_outcomes()
            rows = spool.store.query("SELECT COUNT(*) AS n FROM messages")[0]["n"]
            # The state a kill -9 now would leave: the file is there, so must be its rows.
            assert spool.path("A").exists() and rows == 1
        gate.set()
        await spool.close()
        assert not spool.path("A").exists()
        assert spool.store.query("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
        spool.store.close()

    asyncio.run(run())


class _NoHolds:
    """Holds that hold nothing (the deliverer under test never calls the network)."""

    def is_held(self, *addresses: str) -> bool:
        return False


def test_an_exception_while_recording_keeps_one_outcome_per_recipient(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording the second of three 250s raises: the first stays done, the second is
    counted off once, only the third (no outcome yet) is retried; the file stays until
    the third is delivered."""
    rcpts = ["a@corp.example", "b@corp.example", "c@corp.example"]

    async def run() -> None:
        spool = Spool(tmp_path / "spool", Store(tmp_path / "fed.db"))
        deliverer = Deliverer(spool.store, spool, None, _NoHolds(),  # type: ignore[arg-type]
                              DeliverySettings())
        spool.start()
        await spool.accept("M", "s@x.example", rcpts, BODY, "<a@t>")
        items = {p.rcpt: p for p in deliverer._ready}
        job = Job(items[rcpts[0]], primary={r: items[r] for r in rcpts})
        for r in rcpts:
            deliverer._inflight[("M", r)] += 1
        calls = []

        def count_delivery(*args: object, **kwargs: object) -> None:
            calls.append(args)
            if len(calls) == 2:
                raise RuntimeError("a bug while recording")

        async def read(item: PendingRecipient) -> bytes:
            return BODY

        async def transact(*args: object) -> tuple[dict[str, Reply], None]:
            return dict.fromkeys(rcpts, Reply(250, "2.0.0 Ok")), None

        monkeypatch.setattr(metrics, "count_delivery", count_delivery)
        monkeypatch.setattr(deliverer, "_read", read)
        monkeypatch.setattr(deliverer, "_transact", transact)
        dest = Destination("s1", System("s1", "127.0.0.1", 1, "lmtp"))
        await deliverer._attempt(dest, job, None)

        retried = [entry[2].rcpt for entry in deliverer._deferred]
        assert retried == [rcpts[2]]  # not the two delivered ones
        assert deliverer._left["M"] == 1
        spool.write_outcomes()
        await asyncio.sleep(0.05)
        assert spool.path("M").exists()  # c is still pending: the file must stay
        status = {str(r["rcpt"]): str(r["status"]) for r in spool.store.query(
            "SELECT rcpt, status FROM recipients WHERE queue_id = 'M'")}
        assert status[rcpts[0]] == "done" and status[rcpts[2]] == "pending"
        await spool.close()
        spool.store.close()

    asyncio.run(run())


def test_back_off_doubles_with_jitter_up_to_the_cap() -> None:
    assert backoff(1, 2.0, 100.0, rand=lambda: 1.0) == 2.0
    assert backoff(1, 2.0, 100.0, rand=lambda: 0.0) == 1.0
    assert backoff(4, 2.0, 100.0, rand=lambda: 1.0) == 16.0
    assert backoff(50, 2.0, 100.0, rand=lambda: 1.0) == 100.0
    assert backoff(10_000, 2.0, 100.0, rand=lambda: 0.0) == 50.0
    draws = {backoff(3, 2.0, 100.0) for _ in range(50)}
    assert len(draws) > 40 and all(4.0 <= d <= 8.0 for d in draws)


def test_a_deferral_uses_the_jittered_back_off(tmp_path: Path) -> None:
    """Ten recipients that failed together do not all come back in the same instant."""
    async def run() -> list[float]:
        spool = Spool(tmp_path / "spool", Store(tmp_path / "fed.db"))
        deliverer = Deliverer(spool.store, spool, None, _NoHolds(),  # type: ignore[arg-type]
                              DeliverySettings(retry_base=10.0, retry_max=40.0))
        delays = []
        for n in range(10):
            item = PendingRecipient("M", f"r{n}@corp.example", "", None, attempts=2,
                                    received_at=1e12)
            deliverer._defer(item, None, None, Reply(451, "later"), [])
            delays.append(item.next_try - time.time())
        await spool.close()
        spool.store.close()
        return delays

    delays = asyncio.run(run())
    assert all(19.0 <= d <= 40.0 for d in delays), delays  # attempt 3: 20..40 s
    assert max(delays) - min(delays) > 1.0, delays


def test_a_delivery_recorded_just_before_a_kill_is_not_delivered_again(tmp_path: Path) -> None:
    """The outcome buffer dies with the process; done.log (written at once) does not."""
    accept(tmp_path, {"A": ["a@corp.example", "b@corp.example"]})

    async def deliver_then_die() -> None:
        spool = Spool(tmp_path / "spool", Store(tmp_path / "fed.db"))
        spool.recover()
        spool.start()
        spool.mark_done("A", "a@corp.example")  # buffered for the next flush ...
        spool.store.close()  # ... which never comes: kill -9 (nothing more is written)

    asyncio.run(deliver_then_die())
    spool = Spool(tmp_path / "spool", Store(tmp_path / "fed.db"))
    assert spool.recover() == 1
    assert [(p.queue_id, p.rcpt) for p in spool.pending()] == [("A", "b@corp.example")]
    assert not spool.done_log.exists()  # applied, then emptied
