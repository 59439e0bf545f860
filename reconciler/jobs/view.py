"""PURE: what the status page and `reconcile status` show of the workers' data jobs.

`reconciler.jobs.read` gathers the facts (`JobFacts`: the rows of `data_jobs` that are not
merely queued, the queued ones counted per source and target system, the workers of
`data_workers`); `jobs_view` turns them into what both faces print, so that they never
disagree. Nothing here reads a database or a clock: `now` is given.

A running job's lease is its worker's: the worker refreshes `last_seen` every heartbeat,
and a worker not seen for its `stalled` seconds is dead to the fleet (the other workers
hand its jobs back to the queue). Such a job, or one whose procrastinate job was handed
back or ended without a result, is shown as "lease expired, waiting for another worker"
until a worker takes it (the row then names the new worker, attempt + 1).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reconciler.humanize import human_duration

# What each data part is (registry.DATA_PARTS: E11's part is the E12 validation).
STEP_TEXT = {
    "E11": "E12 validation",
    "E15": "E15 copy + verification",
    "E17": "E17 diary merge",
    "E41": "E41 final delta + verification",
    "prestage": "prestage copy",
}
EXPIRED = "lease expired, waiting for another worker"


@dataclass(frozen=True)
class JobFact:
    """A row of `data_jobs` that a worker took (running, or its result not yet recorded)."""

    address: str
    step: str
    status: str  # running | done | error
    worker: str | None
    attempts: int
    enqueued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    source: str | None = None
    target: str | None = None
    # procrastinate's job of a running row is waiting for a worker again, or ended without
    # a result (its worker gave it up): nobody runs it now, whatever the row says.
    abandoned: bool = False


@dataclass(frozen=True)
class QueuedFact:
    """Queued rows of one step between two systems."""

    source: str
    target: str
    step: str
    count: int
    oldest: datetime


@dataclass(frozen=True)
class WorkerFact:
    """A row of `data_workers`."""

    name: str
    host: str
    pid: int
    concurrency: int
    heartbeat: float
    stalled: float
    started_at: datetime
    last_seen: datetime


@dataclass(frozen=True)
class JobFacts:
    """Everything the view is made from."""

    jobs: tuple[JobFact, ...] = ()
    queued: tuple[QueuedFact, ...] = ()
    workers: tuple[WorkerFact, ...] = ()


@dataclass(frozen=True)
class JobLine:
    """One data job a worker took."""

    address: str
    step: str
    what: str
    state: str  # running | lease expired | done | error
    worker: str | None
    since: datetime | None  # when this attempt started
    seconds: float  # since then
    heartbeat_age: float | None  # seconds since its worker was last seen (None: no worker row)
    attempts: int
    source: str | None
    target: str | None
    text: str

    @property
    def expired(self) -> bool:
        return self.state == "lease expired"

    @property
    def short(self) -> str:
        """For a mailbox's row: `running on h1:1`, `lease expired`, `done on h1:1`."""
        return self.state if self.expired else f"{self.state} on {self.worker}"

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "step": self.step, "what": self.what,
                "state": self.state, "worker": self.worker, "since": stamp(self.since),
                "seconds": round(self.seconds, 1),
                "heartbeat_age": None if self.heartbeat_age is None
                else round(self.heartbeat_age, 1),
                "attempts": self.attempts, "source": self.source, "target": self.target,
                "text": self.text}


@dataclass(frozen=True)
class QueuedLine:
    """Jobs waiting for a worker between two systems."""

    source: str
    target: str
    count: int
    steps: tuple[tuple[str, int], ...]  # (step, count), in step order
    oldest_age: float  # seconds the oldest has waited

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "count": self.count,
                "steps": dict(self.steps), "oldest_age": round(self.oldest_age, 1)}


@dataclass(frozen=True)
class WorkerLine:
    """One worker: what it runs, when it was last seen."""

    name: str
    host: str
    pid: int
    running: int
    concurrency: int
    started_at: datetime
    last_seen: datetime
    seen_age: float
    stalled: float
    alive: bool

    @property
    def text(self) -> str:
        if self.alive:
            return f"last seen {age(self.seen_age)} ago"
        return (f"lease expired: last seen {age(self.seen_age)} ago "
                f"(dead after {age(self.stalled)})")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "pid": self.pid,
                "running": self.running, "concurrency": self.concurrency,
                "started_at": stamp(self.started_at), "last_seen": stamp(self.last_seen),
                "last_seen_age": round(self.seen_age, 1), "stalled": self.stalled,
                "alive": self.alive, "text": self.text}


@dataclass(frozen=True)
class JobsView:
    """The workers' side of the wave; `empty` with SQLite or no worker ever started."""

    jobs: tuple[JobLine, ...] = ()
    queued: tuple[QueuedLine, ...] = ()
    workers: tuple[WorkerLine, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.jobs or self.queued or self.workers)

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs if j.state == state)

    @property
    def queued_total(self) -> int:
        return sum(q.count for q in self.queued)

    @property
    def summary(self) -> str:
        """`2 running, 1 lease expired, 14 queued, 3 workers (1 dead)`."""
        parts = [f"{self.count('running')} running"]
        if self.count("lease expired"):
            parts.append(f"{self.count('lease expired')} lease expired")
        finished = self.count("done") + self.count("error")
        if finished:
            parts.append(f"{finished} finished, to be recorded")
        parts.append(f"{self.queued_total} queued")
        dead = sum(1 for w in self.workers if not w.alive)
        workers = f"{len(self.workers)} worker{'' if len(self.workers) == 1 else 's'}"
        parts.append(workers + (f" ({dead} dead)" if dead else ""))
        return ", ".join(parts)

    def of(self, address: str) -> list[JobLine]:
        """The jobs of one mailbox (its page)."""
        return [j for j in self.jobs if j.address == address]

    def by_address(self) -> dict[str, JobLine]:
        """address -> its job (the first, in the view's order: an expired lease first)."""
        found: dict[str, JobLine] = {}
        for j in self.jobs:
            found.setdefault(j.address, j)
        return found


def stamp(at: datetime | None) -> str | None:
    return None if at is None else at.strftime("%Y-%m-%dT%H:%M:%SZ")


def age(seconds: float) -> str:
    """`0.4 s`, `12 s`, `3m`, `2h05m`: a heartbeat's age reads in tenths."""
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return human_duration(seconds)


def _job(fact: JobFact, workers: dict[str, WorkerFact], now: datetime) -> JobLine:
    worker = workers.get(fact.worker or "")
    seen = None if worker is None else (now - worker.last_seen).total_seconds()
    since = fact.started_at or fact.enqueued_at
    seconds = max((now - since).total_seconds(), 0.0)
    what = STEP_TEXT.get(fact.step, fact.step)
    if fact.status in ("done", "error"):
        state = fact.status
        text = (f"{'done' if state == 'done' else 'failed'} on {fact.worker}, "
                "to be recorded at the reconciler's next pass")
    elif fact.abandoned:
        state, text = "lease expired", f"{EXPIRED} ({fact.worker} gave it up)"
    elif worker is None:
        state, text = "lease expired", f"{EXPIRED} ({fact.worker} is gone)"
    elif seen is not None and seen > worker.stalled:
        state, text = "lease expired", f"{EXPIRED} ({fact.worker} last seen {age(seen)} ago)"
    else:
        state = "running"
        text = (f"running on {fact.worker} for {age(seconds)}, "
                f"heartbeat {age(seen or 0.0)} ago, attempt {fact.attempts}")
    return JobLine(address=fact.address, step=fact.step, what=what, state=state,
                   worker=fact.worker, since=fact.started_at, seconds=seconds,
                   heartbeat_age=seen, attempts=fact.attempts, source=fact.source,
                   target=fact.target, text=text)


ORDER = {"lease expired": 0, "running": 1, "error": 2, "done": 3}


def jobs_view(facts: JobFacts, now: datetime, *, addresses: Collection[str] | None = None,
              system: str | None = None) -> JobsView:
    """PURE: the view of the facts at `now`; `addresses` keeps only those mailboxes' jobs,
    `system` only the jobs and queued counts from or to that system (`reconcile status`'s
    filters). The workers are always all of them."""
    workers = {w.name: w for w in facts.workers}
    kept = [f for f in facts.jobs
            if (addresses is None or f.address in addresses)
            and (system is None or system in (f.source, f.target))]
    jobs = sorted((_job(f, workers, now) for f in kept),
                  key=lambda j: (ORDER.get(j.state, 9), j.address, j.step))
    pairs: dict[tuple[str, str], list[QueuedFact]] = {}
    for q in facts.queued:
        if system is None or system in (q.source, q.target):
            pairs.setdefault((q.source, q.target), []).append(q)
    queued = tuple(
        QueuedLine(source, target, sum(q.count for q in group),
                   tuple((q.step, q.count) for q in sorted(group, key=lambda q: q.step)),
                   max((now - min(q.oldest for q in group)).total_seconds(), 0.0))
        for (source, target), group in sorted(pairs.items()))
    running: dict[str, int] = {}
    for j in jobs:
        if j.state == "running" and j.worker is not None:
            running[j.worker] = running.get(j.worker, 0) + 1
    lines = []
    for w in sorted(facts.workers, key=lambda w: w.name):
        seen = (now - w.last_seen).total_seconds()
        lines.append(WorkerLine(name=w.name, host=w.host, pid=w.pid,
                                running=running.get(w.name, 0), concurrency=w.concurrency,
                                started_at=w.started_at, last_seen=w.last_seen,
                                seen_age=max(seen, 0.0), stalled=w.stalled,
                                alive=seen <= w.stalled))
    return JobsView(tuple(jobs), queued, tuple(lines))
