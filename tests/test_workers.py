"""`reconcile worker` processes on a private PostgreSQL: the reconciler queues the data
steps, the workers run them, the engine records the transitions; the limits of a system
hold for all workers together.

Real processes throughout: fed, s1 and s2 (the embedded world), PostgreSQL, the workers
(`python -m reconciler worker`, stopped by PID). Messages are counted by Message-ID in the
mailboxes themselves (helpers: tests/workerutil.py).
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.state.model import DataJob, utcnow
from reconciler.workers.fleet import FleetPace

from helpers.waiting import wait_for
from pgutil import PrivatePostgres
from workerutil import (
    BackgroundApply,
    Workers,
    apply_queued,
    copy_events,
    prepared,
    states,
)
from world import World, mailbox_message_ids

pytestmark = pytest.mark.timeout(240)


def test_two_workers_share_a_wave_and_copy_each_mailbox_once(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    throttled: dict[str, object] = {"throttle": {"messagesPerSecond": 60}}
    engine, seeded = prepared(world, postgres, tmp_path, "share", 6, 12, {"ps": throttled})
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        workers.start()
        workers.start()
        workers.wait_ready(engine)
        report = apply_queued(engine)
    finally:
        workers.stop()
    assert report.errors == [], report.errors
    assert states(engine, set(seeded)) == Counter({13: 6})
    for address, ids in seeded.items():
        found = mailbox_message_ids(engine, "s2", address)
        assert set(found) >= ids and all(found[i] == 1 for i in ids), (address, found)
        assert mailbox_message_ids(engine, "s1", address) == Counter()  # E41 after the proof
    done = copy_events(engine, seeded)
    # One E15 per mailbox, recorded by the engine, each run by a worker; both worked.
    assert len(done) == 6 and sum(int(str(d["copied"])) for d in done) == 6 * 12
    assert len({d["worker"] for d in done}) == 2, done
    assert len(copy_events(engine, seeded, "E41-E42")) == 6
    with engine.store.session() as session:
        assert session.scalars(select(DataJob)).all() == []  # every result consumed


def _max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def test_max_parallel_of_a_system_holds_across_workers(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """Two policies of maxParallel 2 each let the plan run four copies from s1 at once;
    three workers of two jobs could run six; s1 (source) takes two at a time."""
    spec: dict[str, object] = {"maxParallel": 2, "throttle": {"messagesPerSecond": 40}}
    engine, seeded = prepared(world, postgres, tmp_path, "par", 8, 10,
                              {"pa": spec, "pb": spec})
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        for _ in range(3):
            workers.start(concurrency=2)
        workers.wait_ready(engine)
        report = apply_queued(engine)
    finally:
        workers.stop()
    assert report.errors == [], report.errors
    assert states(engine, set(seeded)) == Counter({13: 8})
    done = copy_events(engine, seeded)
    spans = [(datetime.fromisoformat(str(d["copy_started"])),
              datetime.fromisoformat(str(d["copy_finished"]))) for d in done]
    assert len(spans) == 8
    assert _max_overlap(spans) == 2, spans
    assert len({d["worker"] for d in done}) >= 2


def test_a_worker_runs_as_many_copies_at_once_as_its_concurrency(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """One worker of `--concurrency` cores + 6, more than asyncio's default executor of
    cores + 4 threads in which procrastinate runs a sync task: every job copies at once
    (the system's shared 40 msg/s makes each copy last the whole wave)."""
    concurrency = (os.cpu_count() or 1) + 6
    spec: dict[str, object] = {"maxParallel": concurrency,
                               "throttle": {"messagesPerSecond": 40}}
    engine, seeded = prepared(world, postgres, tmp_path, "conc", concurrency, 20, {"pc": spec})
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        workers.start(concurrency=concurrency)
        workers.wait_ready(engine)
        report = apply_queued(engine)
    finally:
        workers.stop()
    assert report.errors == [], report.errors
    done = copy_events(engine, seeded)
    spans = [(datetime.fromisoformat(str(d["copy_started"])),
              datetime.fromisoformat(str(d["copy_finished"]))) for d in done]
    assert len(spans) == concurrency
    assert _max_overlap(spans) == concurrency, spans


def test_a_throttling_answer_slows_every_worker(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """Two workers copy from s1 at its shared 20 msg/s; s1 answers one of them "slow
    down" twice (what the mover's runner passes to the system's pace, here said by the
    test for the worker that got it): both copies wait the back-off, 3 + 6 s."""
    slow: dict[str, object] = {"throttle": {"messagesPerSecond": 20}}
    engine, seeded = prepared(world, postgres, tmp_path, "thr", 2, 60, {"pq": slow})
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    applying = BackgroundApply(engine)

    def copied() -> dict[str, int]:
        return {a: sum(mailbox_message_ids(engine, "s2", a).values()) for a in seeded}

    try:
        workers.start()
        workers.start()
        workers.wait_ready(engine)
        applying.start()
        wait_for(lambda: all(n >= 3 for n in copied().values()), 60,
                 "both workers copying")
        answered = utcnow()
        pace = FleetPace(engine.store.engine, "s1", base=3.0)
        pauses = [pace.throttled("NO [THROTTLED] too many requests") for _ in range(2)]
        at_answer = copied()
        applying.join()
    finally:
        applying.stop()
        workers.stop()
    assert pauses == [3.0, 6.0]
    assert all(n < 60 for n in at_answer.values()), at_answer  # both still had work
    assert applying.outcome and applying.outcome[0].errors == [], applying.outcome
    done = copy_events(engine, seeded)
    assert len({d["worker"] for d in done}) == 2, done
    for d in done:  # without the shared back-off each would end ~2 s after the answer
        finished = datetime.fromisoformat(str(d["copy_finished"]))
        assert (finished - answered).total_seconds() >= 8.5, (d, answered)
    for address, ids in seeded.items():
        found = mailbox_message_ids(engine, "s2", address)
        assert {i: found[i] for i in ids} == {i: 1 for i in ids}
