"""`reconcile worker` processes on a private PostgreSQL: the reconciler queues the data
steps, the workers run them, the engine records the transitions.

Real processes throughout: fed, s1 and s2 (the embedded world), PostgreSQL, the workers
(`python -m reconciler worker`, stopped by PID). Messages are counted by Message-ID in the
mailboxes themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import ApplyReport, Engine
from reconciler.state.model import DataJob, Event, Migration
from reconciler.workers.queue import Queue

from helpers.processes import stop_process
from helpers.waiting import wait_for
from pgutil import PrivatePostgres
from world import REPO, World, mailbox_message_ids, placement, policy

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().start()
    yield server
    server.stop()


class Workers:
    """`reconcile worker` processes of one test (stopped by PID at the end)."""

    def __init__(self, specs: Path, url: str, logs: Path) -> None:
        self.specs, self.url, self.logs = specs, url, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, concurrency: int = 1) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        log = open(self.logs / f"worker{n}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "--specs", str(self.specs), "--state",
             self.url, "worker", "--concurrency", str(concurrency), "--heartbeat", "0.5",
             "--stalled", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def seed(engine: Engine, address: str, count: int) -> set[str]:
    """`count` old messages in BOX1 (INBOX and Sent); their Message-IDs."""
    s1, box = engine.drivers["s1"], mailbox_id_for(address)
    ids = set()
    for n in range(count):
        mid = f"<w{n}.{box}@corp.example>"
        s1.append_message(box, "Sent" if n % 3 == 0 else "INBOX", (
            f"From: x@corp.example\nTo: {address}\nMessage-ID: {mid}\nSubject: old {n}\n\n"
            f"old body {n}\n").encode(), flags="S", internal_date=1_600_000_000.0 + n)
        ids.add(mid)
    return ids


def prepared(world: World, postgres: PrivatePostgres, root: Path, name: str,
             count: int, messages: int, policies: dict[str, dict[str, object]],
             ) -> tuple[Engine, dict[str, set[str]]]:
    """Mailboxes created on s1 and seeded, then the specs moving them to s2 (one
    placement per policy, the mailboxes dealt out in turn); the engine for those specs."""
    names = sorted(policies)
    boxes = {p: [{"address": f"{name}{i}@corp.example"} for i in range(count)
                 if names[i % len(names)] == p] for p in names}
    home = world.write(root / "home", [*(policy(p, **spec) for p, spec in policies.items()),
                                       *(placement(f"home-{p}", "s1", boxes[p], policy_name=p)
                                         for p in names)])
    engine = world.engine(home, postgres.url)
    assert engine.apply().errors == []
    seeded = {b["address"]: seed(engine, b["address"], messages)
              for p in names for b in boxes[p]}
    moved = world.write(root / "moved", [*(policy(p, **spec) for p, spec in policies.items()),
                                         *(placement(f"wave-{p}", "s2", boxes[p],
                                                     policy_name=p) for p in names)])
    return world.engine(moved, postgres.url), seeded


def with_queue(engine: Engine) -> Queue:
    queue = Queue(engine.store)
    engine.jobs = queue
    return queue


def copy_events(engine: Engine, addresses: set[str] | dict[str, set[str]],
                step: str = "E15") -> list[dict[str, object]]:
    """The details of `step`'s events of these addresses (the module shares one store)."""
    with engine.store.session() as session:
        return [json.loads(e.detail) for e in session.scalars(
            select(Event).where(Event.step == step, Event.address.in_(set(addresses)))
            .order_by(Event.id))]


def states(engine: Engine, addresses: set[str]) -> Counter[int]:
    with engine.store.session() as session:
        return Counter(m.state for m in session.scalars(
            select(Migration).where(Migration.address.in_(addresses))))


def test_two_workers_share_a_wave_and_copy_each_mailbox_once(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    throttled: dict[str, object] = {"throttle": {"messagesPerSecond": 60}}
    engine, seeded = prepared(world, postgres, tmp_path, "share", 6, 12, {"ps": throttled})
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        workers.start()
        workers.start()
        queue = with_queue(engine)
        report = engine.apply(max_passes=400)
        queue.close()
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


def test_a_rerun_or_a_second_reconciler_queues_a_step_once(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """No worker yet: two reconcilers in turn (each gives up waiting after a second) plan
    the same copy; one job and one row are queued, and the mailbox is copied once."""
    engine, seeded = prepared(world, postgres, tmp_path, "once", 1, 5, {"po": {}})
    (address, ids), = seeded.items()
    for _ in range(2):
        again = world.engine(Path(engine.specs.root), postgres.url)
        again.jobs = queue = Queue(again.store, max_wait=1.0)
        again.apply()
        queue.close()
    with engine.store.engine.connect() as conn:
        jobs = conn.exec_driver_sql(
            "SELECT count(*) FROM procrastinate_jobs WHERE args->>'migration_id' = "
            "(SELECT id::text FROM migrations WHERE address = %(a)s)", {"a": address}).scalar()
    with engine.store.session() as session:
        rows = session.scalars(select(DataJob).where(DataJob.address == address)).all()
    assert jobs == 1 and [(r.step, r.status) for r in rows] == [("E15", "queued")]
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        workers.start()
        queue = with_queue(engine)
        report = engine.apply(max_passes=100)
        queue.close()
    finally:
        workers.stop()
    assert report.errors == [] and states(engine, {address}) == Counter({13: 1})
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}
    assert len([d for d in copy_events(engine, seeded) if d.get("worker")]) >= 1


def test_a_worker_killed_mid_copy_hands_its_job_to_another(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    slow: dict[str, object] = {"throttle": {"messagesPerSecond": 15},
            "deleteSource": {"after": "0s", "consent": False}}
    engine, seeded = prepared(world, postgres, tmp_path, "kill", 1, 60, {"pk": slow})
    (address, ids), = seeded.items()
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    queue = with_queue(engine)
    outcome: list[ApplyReport] = []
    applying = threading.Thread(target=lambda: outcome.append(engine.apply(max_passes=200)))
    try:
        first = workers.start()
        applying.start()
        wait_for(lambda: sum(mailbox_message_ids(engine, "s2", address).values()) >= 10,
                 60, "the first worker to copy 10 messages")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        partial = sum(mailbox_message_ids(engine, "s2", address).values())
        assert partial < len(ids)  # killed mid-copy
        workers.start()
        applying.join(120)
        assert not applying.is_alive()
    finally:
        engine.should_stop = lambda: True
        applying.join(10)
        queue.close()
        workers.stop()
    assert outcome and outcome[0].errors == [], outcome
    assert states(engine, {address}) == Counter({10: 1})
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}  # each exactly once
    assert set(mailbox_message_ids(engine, "s1", address)) == ids  # nothing deleted
    (done,) = copy_events(engine, seeded)
    assert done["worker"] != f"{os.uname().nodename}:{first.pid}"  # finished elsewhere


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
        queue = with_queue(engine)
        report = engine.apply(max_passes=400)
        queue.close()
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
