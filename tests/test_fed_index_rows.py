"""The spool's index rows are written late: a message delivered first never gets any.

In-process, on a real spool folder and SQLite file: what the index holds while a message
waits, when its rows appear, that readers never see the tables behind the spool's memory,
and that a crash (the spool abandoned without a stop, as kill -9 leaves it) neither loses
an acknowledged message nor redelivers one whose delivery done.log recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fed.queue import spool as spool_module
from fed.queue.spool import Spool
from fed.queue.store import Store

RCPT = "a@corp.example"
BODY = b"Subject: a\r\n\r\nbody a\r\n"


def open_spool(root: Path, start: bool = True) -> tuple[Spool, list[str]]:
    """A recovered (and started) spool on `root`, and the list every SQL statement its
    store runs joins."""
    store = Store(root / "fed.db")
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    spool = Spool(root / "spool", store)
    spool.recover()
    if start:
        spool.start()
    return spool, statements


def rows(spool: Spool, queue_id: str) -> list[tuple[str, str]]:
    """(rcpt, status) of `queue_id` as the file holds them, without letting the spool
    catch up first."""
    return [(str(r["rcpt"]), str(r["status"])) for r in spool.store.query(
        "SELECT rcpt, status FROM recipients WHERE queue_id = ? ORDER BY rcpt", (queue_id,),
        catch_up=False)]


async def until(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.005)


def test_a_message_delivered_first_never_writes_index_rows(tmp_path: Path) -> None:
    async def run() -> None:
        spool, statements = open_spool(tmp_path)
        await spool.accept("A", "s@x.example", [RCPT], BODY, "<a@t>")
        spool.mark_done("A", RCPT)
        spool.log_delivery("A", RCPT, RCPT, "sink", "<a@t>", "delivered", "250 ok")
        spool.forget("A")
        spool.write_outcomes(index_all=False)  # the flush timer's call
        await until(lambda: spool.unindexed_skipped == 1, "the file left the queue")
        spool.write_outcomes(index_all=False)
        assert not (tmp_path / "spool" / "queue" / "A.eml").exists()
        assert (tmp_path / "spool" / "done.log").stat().st_size == 0  # emptied: file gone
        await spool.close()
        written = [s for s in statements if "INTO messages" in s or "INTO recipients" in s
                   or "DELETE" in s]
        assert written == []
        # The delivery log still has its row: only the queue's index was skipped.
        assert [str(r["result"]) for r in spool.store.query(
            "SELECT result FROM deliveries WHERE queue_id = 'A'")] == ["delivered"]
        assert spool.unindexed_written == 0
        spool.store.close()

    asyncio.run(run())


def test_readers_see_a_message_accepted_a_moment_ago(tmp_path: Path) -> None:
    async def run() -> None:
        spool, _ = open_spool(tmp_path)
        await spool.accept("A", "s@x.example", [RCPT, "b@corp.example"], BODY, None)
        assert rows(spool, "A") == []  # held back ...
        assert spool.waiting(RCPT) == 1  # ... but a reader makes the spool catch up first
        assert rows(spool, "A") == [(RCPT, "pending"), ("b@corp.example", "pending")]
        # A writer too: the queue admin's delete finds the rows it deletes.
        await spool.accept("B", "s@x.example", [RCPT], BODY, None)
        with spool.store.transaction() as db:
            deleted = db.execute("DELETE FROM recipients WHERE queue_id = 'B'").rowcount
        assert deleted == 1
        spool.write_outcomes()
        assert rows(spool, "B") == []  # and the rows do not come back behind its back
        await spool.close()
        spool.store.close()

    asyncio.run(run())


def test_a_waiting_message_is_indexed_after_index_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "INDEX_AFTER", 0.05)

    async def run() -> None:
        spool, _ = open_spool(tmp_path)
        await spool.accept("A", "s@x.example", [RCPT], BODY, None)
        assert rows(spool, "A") == []
        # Nobody reads: the spool's own timer writes them.
        await until(lambda: rows(spool, "A") == [(RCPT, "pending")], "A's rows written")
        assert spool.unindexed_written == 1
        await spool.close()
        spool.store.close()

    asyncio.run(run())


def test_a_retry_writes_the_rows_then_its_outcome(tmp_path: Path) -> None:
    async def run() -> None:
        spool, _ = open_spool(tmp_path)
        await spool.accept("A", "s@x.example", [RCPT, "b@corp.example"], BODY, None)
        spool.mark_done("A", "b@corp.example")
        spool.mark_retry("A", RCPT, 1, time.time() + 60, "451 4.3.0 try later")
        spool.write_outcomes(index_all=False)
        got = spool.store.query("SELECT rcpt, status, attempts, last_error FROM recipients "
                                "WHERE queue_id = 'A' ORDER BY rcpt", catch_up=False)
        assert [tuple(r) for r in got] == [
            (RCPT, "pending", 1, "451 4.3.0 try later"),
            ("b@corp.example", "done", 0, None)]  # the done mark made before, kept
        await spool.close()
        spool.store.close()

    asyncio.run(run())


def test_a_crash_before_the_rows_keeps_the_waiting_and_drops_the_delivered(
        tmp_path: Path) -> None:
    async def crash() -> None:
        spool, _ = open_spool(tmp_path)
        await spool.accept("A", "s@x.example", [RCPT], BODY, None)  # waiting
        await spool.accept("B", "s@x.example", [RCPT, "b@corp.example"], BODY, None)
        spool.mark_done("B", RCPT)  # delivered to both, its file still in the queue
        spool.mark_done("B", "b@corp.example")
        spool.write_outcomes(index_all=False)
        # done.log is the only record of B's deliveries: it may not be emptied.
        assert (tmp_path / "spool" / "done.log").read_bytes().count(b"\n") == 2
        assert rows(spool, "A") == rows(spool, "B") == []
        # kill -9: no close(), nothing more written.

    asyncio.run(crash())
    spool, _ = open_spool(tmp_path, start=False)  # start-up: recover() is what matters
    assert sorted((p.queue_id, p.rcpt) for p in spool.pending()) == [("A", RCPT)]
    assert not (tmp_path / "spool" / "queue" / "B.eml").exists()
    assert spool.read("A") == BODY
    spool.store.close()


def test_a_grown_done_log_writes_the_marks_it_alone_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "DONE_LOG_MAX", 10)

    async def run() -> None:
        spool, _ = open_spool(tmp_path)
        await spool.accept("A", "s@x.example", [RCPT, "b@corp.example"], BODY, None)
        await spool.accept("B", "s@x.example", [RCPT], BODY, None)
        spool.mark_done("A", RCPT)  # A's file stays: b@ is still to be delivered
        spool.write_outcomes(index_all=False)
        assert rows(spool, "A") == [(RCPT, "done"), ("b@corp.example", "pending")]
        assert rows(spool, "B") == []  # no done mark: still held back
        assert (tmp_path / "spool" / "done.log").stat().st_size == 0
        await spool.close()
        spool.store.close()

    asyncio.run(run())
