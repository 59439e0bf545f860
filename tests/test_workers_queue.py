"""The reconciler's side of the queue over a wave of many jobs (reconciler/workers/queue.py),
on a private PostgreSQL, no worker: a pass over outstanding jobs looks at their rows once,
not once per job; a result a worker writes is taken by the next pass after `wait`; a job
gone without a result is queued again; queuing stays idempotent."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import event, select, text

from reconciler.errors import NotReady
from reconciler.spec.modes import Modes
from reconciler.state.model import DataJob, Migration
from reconciler.state.store import Store, open_store
from reconciler.workers import queue as queue_module
from reconciler.workers.queue import CHANNEL, Queue

from pgutil import PrivatePostgres

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(postgres: PrivatePostgres) -> Iterator[Store]:
    store = open_store(postgres.url)
    with store.engine.begin() as conn:  # each test its own wave
        conn.execute(text("DELETE FROM data_jobs"))
        conn.execute(text("DELETE FROM migrations"))
    yield store
    store.engine.dispose()


def record(store: Store, tag: str, count: int) -> list[Migration]:
    """Migrations at state 7 (E15 due), as the engine leaves them after E11."""
    modes = replace(Modes(), diary=False)
    with store.session() as session:
        rows = [Migration(address=f"{tag}{i}@corp.example", aliases=[], source_system="s1",
                          target_system="s2", source_mailbox=f"{tag}{i}",
                          target_mailbox=f"{tag}{i}", placement="p", modes=modes, state=7,
                          address_migration_id="a") for i in range(count)]
        session.add_all(rows)
        session.flush()
        session.expunge_all()
    return rows


def a_pass(store: Store, queue: Queue, rows: list[Migration]) -> dict[int, dict[str, Any]]:
    """What a pass of the reconciler does for these migrations: `take` each E15 in its own
    step session; the details it returned (the others are not ready)."""
    done = {}
    for m in rows:
        try:
            with store.session() as session:
                done[m.id] = queue.take(session, m, "E15")
        except NotReady:
            continue
    return done


def statements(store: Store) -> list[str]:
    seen: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *rest: seen.append(sql))
    return seen


def jobs_of(store: Store, rows: list[Migration]) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo' AND "
            "(args->>'migration_id')::int = ANY(:ids)"), {"ids": [m.id for m in rows]}).scalar()
            or 0)


def finish(store: Store, m: Migration, copied: int) -> None:
    """What a worker's `_finish` writes: the row done with its detail, and the NOTIFY."""
    with store.engine.begin() as conn:
        conn.execute(text(
            "UPDATE data_jobs SET status = 'done', finished_at = now() at time zone 'utc', "
            "result = CAST(:r AS json) WHERE migration_id = :m"),
            {"m": m.id, "r": f'{{"detail": {{"copied": {copied}}}}}'})
        conn.execute(text(f"NOTIFY {CHANNEL}"))


def test_a_pass_over_many_outstanding_jobs_looks_at_their_rows_once(store: Store) -> None:
    rows = record(store, "many", 80)
    queue = Queue(store)
    try:
        assert a_pass(store, queue, rows) == {}  # every E15 queued
        seen = statements(store)
        for _ in range(3):  # passes while the workers copy: nothing new, nothing queued
            assert a_pass(store, queue, rows) == {}
        # One look at every row (at most one per GLANCE s) and at most one at the jobs
        # waiting: not 80 per pass.
        assert len(seen) <= 3 * 2, seen
        queue.flush()  # as the pass's wait does
        assert jobs_of(store, rows) == 80
        with store.session() as session:
            assert len(session.scalars(select(DataJob)).all()) == 80
    finally:
        queue.close()


def test_a_result_is_taken_by_the_pass_after_wait(store: Store) -> None:
    rows = record(store, "res", 5)
    queue = Queue(store, poll=0.1)
    try:
        assert a_pass(store, queue, rows) == {}
        assert a_pass(store, queue, rows) == {}  # looked at: all queued
        finish(store, rows[2], copied=7)
        assert queue.wait(lambda: False, timeout=10.0)
        assert a_pass(store, queue, rows) == {rows[2].id: {"copied": 7}}
        with store.session() as session:  # the done row went with the step's session
            assert sorted(j.migration_id for j in session.scalars(select(DataJob))) == \
                sorted(m.id for m in rows if m is not rows[2])
        assert a_pass(store, queue, rows) == {}  # taken once
    finally:
        queue.close()


def test_a_job_gone_without_a_result_is_queued_again_once(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = record(store, "gone", 3)
    queue = Queue(store)
    try:
        a_pass(store, queue, rows)
        queue.flush()
        with store.engine.begin() as conn:  # a worker lost the database with its job
            conn.execute(text("DELETE FROM procrastinate_jobs WHERE "
                              "(args->>'migration_id')::int = :m"), {"m": rows[0].id})
        assert jobs_of(store, rows) == 2
        monkeypatch.setattr(queue_module, "RECHECK", 0.0)
        a_pass(store, queue, rows)
        a_pass(store, queue, rows)
        assert jobs_of(store, rows) == 3  # queued again, and the others not twice
        with store.session() as session:
            assert [j.status for j in session.scalars(select(DataJob))] == ["queued"] * 3
    finally:
        queue.close()


def test_a_pass_defers_its_new_jobs_together_and_a_lost_batch_is_queued_again_once(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new jobs of a pass are held, then deferred together when the pass waits; a
    reconciler killed before that leaves rows without jobs: the next one queues each again,
    and the first one's late batch adds none twice."""
    rows = record(store, "held", 30)
    first = Queue(store)
    try:
        monkeypatch.setattr(queue_module, "HOLD", 1e9)  # nothing goes out during the pass
        assert a_pass(store, first, rows) == {}
        assert jobs_of(store, rows) == 0  # held: the "killed" reconciler's batch
        monkeypatch.setattr(queue_module, "RECHECK", 0.0)
        second = Queue(store)
        try:
            assert a_pass(store, second, rows) == {}  # rows queued, no job: queued again
            assert jobs_of(store, rows) == 30
        finally:
            second.close()
        first.flush()  # refused as a batch, then one at a time: every one is there already
        assert jobs_of(store, rows) == 30
        more = record(store, "held-more", 10)
        assert a_pass(store, first, more) == {}
        assert jobs_of(store, more) == 0
        assert not first.wait(lambda: False, timeout=0.1)  # the pass waits: they go out
        assert jobs_of(store, more) == 10
    finally:
        first.close()
