"""Workers for tests: `reconcile worker` processes on a private PostgreSQL, and a wave of
seeded mailboxes in the embedded world for them (tests/test_workers*.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import ProgrammingError

from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import ApplyReport, Engine
from reconciler.state.model import Event, Migration
from reconciler.workers.queue import Queue

from helpers.processes import stop_process
from helpers.waiting import wait_for
from pgutil import PrivatePostgres
from world import REPO, World, placement, policy


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

    def wait_ready(self, engine: Engine, timeout: float = 60.0) -> None:
        """Until every started worker sends its heartbeat (so that the first job does not
        go to the one that happened to start first)."""
        def ready() -> bool:
            with engine.store.engine.connect() as conn:
                alive = conn.exec_driver_sql(
                    "SELECT count(*) FROM procrastinate_workers "
                    "WHERE last_heartbeat > now() - interval '2 s'").scalar()
            return int(alive or 0) >= sum(1 for p in self.procs if p.poll() is None)
        wait_for(ready, timeout, "the workers' heartbeats", interval=0.2,
                 retry_on=(ProgrammingError,))

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


def apply_queued(engine: Engine, max_passes: int = 400) -> ApplyReport:
    """One `--apply --workers` to its end: the data steps queued for the running workers."""
    queue = with_queue(engine)
    try:
        return engine.apply(max_passes=max_passes)
    finally:
        queue.close()


class BackgroundApply:
    """`--apply --workers` in a thread, while the test acts on the workers (kills one, cuts
    its database connection, throttles the fleet); `stop` ends it and closes the queue."""

    def __init__(self, engine: Engine, max_passes: int = 200) -> None:
        self.engine = engine
        self.queue = with_queue(engine)
        self.outcome: list[ApplyReport] = []
        self.thread = threading.Thread(
            target=lambda: self.outcome.append(engine.apply(max_passes=max_passes)))

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float = 120) -> None:
        """Wait for the apply to end by itself (it must within `timeout`)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive()

    def stop(self) -> None:
        self.engine.should_stop = lambda: True
        self.thread.join(10)
        self.queue.close()


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
