"""The reconciler's side of the workers: data parts queued as procrastinate jobs.

Why procrastinate (README, "Workers"): the state store already is a PostgreSQL when more
than one machine works on a wave, and procrastinate is a job queue *in* PostgreSQL: claims
with `SELECT ... FOR UPDATE SKIP LOCKED`, wake-ups with LISTEN/NOTIFY, per-job `lock`s and
`queueing_lock`s, worker heartbeats. No broker to run, back up or secure; a job and the
state it belongs to live in the same database.

How a data step goes (the engine and its state machine are unchanged): the step calls
`StepContext.data(m, step, part)`; with workers, that is `Queue.offload`, which

1. finds no `data_jobs` row for (migration, step, state): inserts one (`queued`, in its own
   committed transaction, so a worker never sees a job before its row) and defers the
   procrastinate job with the queueing lock `migration:step:state` (a second reconciler, or
   a re-run, cannot queue it twice: the row is unique and procrastinate refuses a second
   `todo` job with the same queueing lock), then raises NotReady; the new jobs of a pass
   go out together (`flush`: up to BATCH in one statement, within HOLD s, and when the
   pass waits);
2. finds the row `queued` or `running`: NotReady (and, if no procrastinate job is waiting
   or running for it any more, queues it again);
3. finds it `done`: deletes the row *in the step's session* and returns the worker's
   detail, so the engine records the transition, its event and the row's removal in one
   transaction;
4. finds it `error`: deletes it (committed) and raises the error the worker met, so the
   engine's back-off and failure rules apply exactly as to an in-process step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.jobs import Job
from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from reconciler.errors import (
    MailferryError,
    NotReady,
    PermanentError,
    TemporaryError,
    Waiting,
)
from reconciler.state.model import DataJob, Migration, utcnow
from reconciler.state.store import Store, record_event
from reconciler.steps.base import StepContext

TASK = "mailferry.data_step"
QUEUE = "mailferry-data"
CHANNEL = "mailferry_data_jobs"  # a worker NOTIFYs it when it wrote a result
SCHEMA_LOCK = 7316552  # pg_advisory_xact_lock key of the schema's creation
RECHECK = 5.0  # seconds between two looks at the procrastinate job of a queued row
GLANCE = 1.0  # seconds one look at every row's status serves a pass (`Queue.take`)
BATCH = 100  # new jobs deferred in one statement, at most
HOLD = 0.2  # seconds a new job may wait here for the others of its pass (then deferred)
STALE = timedelta(hours=1)  # a result older than this is not used: the step runs again


# A row the reconciler will still ask about: its migration is in the row's state, neither
# frozen nor suspended (anything else is left over and waits for nobody).
LIVE = (Migration.state == DataJob.state, Migration.failed_reason.is_(None),
        Migration.suspended.is_(False))


class WorkerBug(Exception):
    """An unexpected exception in a worker's part (the engine counts it as a bug)."""


def conninfo(url: str) -> str:
    """libpq's connection string for the state store's SQLAlchemy URL."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise MailferryError(f"workers need a PostgreSQL state store, not {parsed.drivername} "
                             "(--state postgresql+psycopg://...)")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def make_app(url: str) -> App:
    """A procrastinate app on the state store's database."""
    return App(connector=PsycopgConnector(conninfo=conninfo(url)))


def ensure_schema(url: str) -> None:
    """procrastinate's tables in the state store's database, created once (serialised)."""
    with psycopg.connect(conninfo(url)) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        found = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
        if found is None or found[0] is None:
            from procrastinate.schema import SchemaManager

            conn.execute(SchemaManager.get_schema())


def lock_of(m: Migration) -> str:
    """procrastinate's `lock` of a migration's jobs: one at a time per mailbox."""
    return f"mailbox:{m.target_system}/{m.target_mailbox}"


def queueing_lock(migration_id: int, step: str, state: int) -> str:
    return f"{migration_id}:{step}:{state}"


def error_result(exc: BaseException) -> dict[str, Any]:
    """What a worker records of the error its part raised (`raise_result` raises it again)."""
    if isinstance(exc, PermanentError | TemporaryError):
        result: dict[str, Any] = {
            "kind": "permanent" if isinstance(exc, PermanentError) else "temporary",
            "message": str(exc.args[0]) if exc.args else "", "address": exc.address,
            "step": exc.step}
        if isinstance(exc, TemporaryError):
            result["delay"] = exc.delay
        if isinstance(exc, Waiting):  # a daily budget spent: no error, a wait
            result["kind"] = "waiting"
        return result
    return {"kind": "bug", "message": f"unexpected {type(exc).__name__} in a worker: {exc}"}


def raise_result(result: dict[str, Any], address: str, step: str) -> None:
    """Raise the error a worker recorded, as the step would have raised it here."""
    kind, message = result.get("kind"), str(result.get("message", ""))
    if result.get("worker"):
        message += f" (on worker {result['worker']})"
    where = {"address": str(result.get("address") or address),
             "step": str(result.get("step") or step)}
    if kind == "permanent":
        raise PermanentError(message, **where)
    if kind == "temporary":
        raise TemporaryError(message, delay=float(result.get("delay") or 5.0), **where)
    if kind == "waiting":
        raise Waiting(message, delay=float(result.get("delay") or 5.0), **where)
    raise WorkerBug(message)


class Queue:
    """The data parts of steps, queued for `reconcile worker` processes."""

    def __init__(self, store: Store, *, notice: Callable[[str], None] | None = None,
                 poll: float = 1.0, max_wait: float | None = None) -> None:
        self.store = store
        self.max_wait = max_wait  # `wait`'s default timeout (--watch: it has timers too)
        ensure_schema(store.url)
        self.app = make_app(store.url)
        self.app.open()
        # Woken by the workers' NOTIFY when a result is written (the poll is the fallback).
        self._listen = psycopg.connect(conninfo(store.url), autocommit=True)
        self._listen.execute(f"LISTEN {CHANNEL}")
        self.notice = notice
        self.poll = poll
        self._checked: dict[int, float] = {}  # data_jobs.id -> monotonic time of last look
        self._mark: datetime | None = None  # the newest result `wait` has seen
        # One look at every row's status, for a pass over thousands of outstanding jobs:
        # (migration, step, state) -> (row id, status), at most GLANCE s old, dropped when
        # `wait` sees a new result; and the queueing locks of the procrastinate jobs
        # waiting or running, at most RECHECK s old.
        self._glance: dict[tuple[int, str, int], tuple[int, str]] | None = None
        self._glanced = 0.0
        self._alive: set[str] = set()
        self._alive_at = -1e9
        self._held: list[Job] = []  # new jobs not deferred yet (`flush`)
        self._held_at = 0.0

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.app.close()
            self._listen.close()

    def _job(self, m: Migration, step: str) -> Job:
        return self.app.configure_task(
            TASK, queue=QUEUE, lock=lock_of(m),
            queueing_lock=queueing_lock(m.id, step, m.state)).make_new_job(
            migration_id=m.id, step=step, state=m.state)

    def _defer(self, m: Migration, step: str) -> None:
        with contextlib.suppress(AlreadyEnqueued):  # waiting already: that job will do
            self.app.job_manager.defer_job(self._job(m, step))

    def flush(self) -> None:
        """Defer the new jobs this process holds, in one statement (a pass queuing 2,000
        migrations: 20 statements, not 2,000). Their rows are committed already: a job
        lost here (the process killed) is queued again by the next look (`_recheck`,
        `wait`'s orphans). One that is waiting already makes procrastinate refuse the
        statement: then one at a time, that one skipped."""
        jobs, self._held = self._held, []
        if not jobs:
            return
        try:
            self.app.job_manager.batch_defer_jobs(jobs)
        except AlreadyEnqueued:
            for job in jobs:
                with contextlib.suppress(AlreadyEnqueued):
                    self.app.job_manager.defer_job(job)

    def _hold(self, m: Migration, step: str) -> None:
        if not self._held:
            self._held_at = time.monotonic()
        self._held.append(self._job(m, step))
        if len(self._held) >= BATCH:
            self.flush()

    def _job_alive(self, ql: str) -> bool:
        """Whether a procrastinate job waits or runs for this queueing lock (one query for
        every lock at most each RECHECK s; one just missing from it is deferred again,
        which procrastinate refuses if it is there: no second job)."""
        if time.monotonic() - self._alive_at >= RECHECK:
            with self.store.engine.connect() as conn:
                self._alive = set(conn.execute(text(
                    "SELECT queueing_lock FROM procrastinate_jobs WHERE queue_name = :q "
                    "AND status IN ('todo', 'doing')"), {"q": QUEUE}).scalars())
            self._alive_at = time.monotonic()
        return ql in self._alive

    def _status(self, key: tuple[int, str, int]) -> tuple[int, str] | None:
        """(row id, status) of a row as the last look at every row saw it (None: none)."""
        if self._glance is None or time.monotonic() - self._glanced >= GLANCE:
            with self.store.engine.connect() as conn:
                self._glance = {(int(r[1]), str(r[2]), int(r[3])): (int(r[0]), str(r[4]))
                                for r in conn.execute(select(
                                    DataJob.id, DataJob.migration_id, DataJob.step,
                                    DataJob.state, DataJob.status))}
            self._glanced = time.monotonic()
        return self._glance.get(key)

    def offload(self, ctx: StepContext, m: Migration, step: str) -> dict[str, Any]:
        return self.take(ctx.session, m, step)

    def take(self, session: Session, m: Migration, step: str) -> dict[str, Any]:
        """`offload` with the caller's session (the done row is deleted in it).

        A pass asks this of every outstanding migration: a row the last look saw queued
        or running answers NotReady without a query (a result is seen at the latest
        GLANCE s later, at once after `wait` returned); a finished one, or none, is read
        (inserted) as it is now."""
        step_session = session
        if self._held and time.monotonic() - self._held_at >= HOLD:
            self.flush()
        key = (m.id, step, m.state)
        seen = self._status(key)
        if seen is not None and seen[1] in ("queued", "running"):
            self._recheck(m, step, seen[0])
            raise NotReady(f"{step} {seen[1]} on a worker", address=m.address, step=step)
        where = (DataJob.migration_id == m.id, DataJob.step == step, DataJob.state == m.state)
        row = None
        if seen is not None:  # none a second ago: inserted at once (unique: no second row)
            with self.store.session() as session:
                row = session.scalars(select(DataJob).where(*where)).first()
                if row is not None and row.status in ("done", "error") and \
                        row.finished_at is not None and row.finished_at < utcnow() - STALE:
                    session.delete(row)  # left over (the migration was suspended meanwhile)
                    row = None
                if row is not None:
                    status, result, row_id = row.status, row.result or {}, row.id
        if row is None:
            try:
                with self.store.session() as session:
                    job = DataJob(migration_id=m.id, step=step, state=m.state,
                                  address=m.address, status="queued", attempts=0,
                                  enqueued_at=utcnow())
                    session.add(job)
                    session.flush()
                    new_id = int(job.id)
            except IntegrityError:  # another reconciler queued it just now
                raise NotReady(f"{step} queued for a worker", address=m.address,
                               step=step) from None
            self._hold(m, step)
            self._checked[new_id] = time.monotonic()
            if self._glance is not None:
                self._glance[key] = (new_id, "queued")
            raise NotReady(f"{step} queued for a worker", address=m.address, step=step)
        if self._glance is not None:
            self._glance[key] = (row_id, status)
        if status == "done":
            step_session.execute(delete(DataJob).where(DataJob.id == row_id))
            self._forget(key, row_id)
            return dict(result.get("detail") or {})
        if status == "error":
            with self.store.session() as session:
                session.execute(delete(DataJob).where(DataJob.id == row_id))
            self._forget(key, row_id)
            raise_result(result, m.address, step)
        self._recheck(m, step, row_id)
        raise NotReady(f"{step} {status} on a worker", address=m.address, step=step)

    def _forget(self, key: tuple[int, str, int], row_id: int) -> None:
        self._checked.pop(row_id, None)
        if self._glance is not None:
            self._glance.pop(key, None)

    def _recheck(self, m: Migration, step: str, row_id: int) -> None:
        """Queue a queued or running row's job again if none waits or runs for it (its job
        ended without a result), looked at every RECHECK s."""
        last = self._checked.get(row_id)
        if last is None or time.monotonic() - last >= RECHECK:
            self._checked[row_id] = time.monotonic()
            if not self._job_alive(queueing_lock(m.id, step, m.state)):
                self._defer(m, step)  # its job ended without a result: queue it again

    def _orphans(self) -> int:
        """Rows queued or running without a procrastinate job waiting or running for
        them: a worker that lost the database gave up its job without a result."""
        with self.store.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM data_jobs d JOIN migrations m ON m.id = d.migration_id "
                "WHERE d.status IN ('queued', 'running') AND m.state = d.state "
                "AND m.failed_reason IS NULL AND NOT m.suspended "
                "AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j WHERE j.queueing_lock = "
                "d.migration_id || ':' || d.step || ':' || d.state "
                "AND j.status IN ('todo', 'doing'))")).scalar() or 0)

    def outstanding(self) -> int:
        """Jobs queued or running on workers."""
        with self.store.session() as session:
            return int(session.scalar(select(func.count()).select_from(DataJob).where(
                DataJob.status.in_(("queued", "running")))) or 0)

    def wait(self, stop: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait for a result newer than the last one seen: True when one came, False
        when nothing is outstanding any more, on `stop`, or after `timeout` seconds."""
        self.flush()  # the pass is over: what it queued goes to the workers
        timeout = self.max_wait if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        said = orphans_seen = time.monotonic()
        while not stop():
            with self.store.session() as session:
                newest = session.scalar(select(func.max(DataJob.finished_at)).where(
                    DataJob.status.in_(("done", "error"))))
                busy = session.scalar(select(func.count()).select_from(DataJob).join(
                    Migration, Migration.id == DataJob.migration_id).where(
                    *LIVE, DataJob.status.in_(("queued", "running")))) or 0
            if newest is not None and (self._mark is None or newest > self._mark):
                self._mark = newest
                self._glance = None  # the next pass looks again
                return True
            if not busy:
                return False
            if time.monotonic() - orphans_seen >= RECHECK:
                orphans_seen = time.monotonic()
                if self._orphans():  # a pass queues them again (`offload`)
                    self._checked.clear()
                    self._alive_at, self._glance = -1e9, None
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self.notice is not None and time.monotonic() - said >= 30:
                said = time.monotonic()
                self.notice(f"waiting for {busy} data jobs on the workers "
                            "(is a `reconcile worker` running?)")
            for _ in self._listen.notifies(timeout=self.poll, stop_after=1):
                pass
        return False


def prestage_on_workers(queue: Queue, store: Store, *, everything: bool = False,
                        echo: Callable[[str], None] = print) -> int:
    """`reconcile prestage --workers`: the prestage copy of every due migration queued for
    the workers; each result recorded as its PRESTAGE event (no transition) as it comes.
    The number of migrations whose prestage failed (they are copied at E15 anyway)."""
    from reconciler.mover.prestage import due

    pending = {m.id: m for m in due(store, everything=everything)}
    failed = 0
    for _ in range(1_000_000):  # bounded: each round waits for a result or 5 s
        if not pending:
            break
        for m in list(pending.values()):
            try:
                with store.session() as session:
                    detail = queue.take(session, m, "prestage")
                    record_event(session, m, "PRESTAGE", detail=detail)
            except NotReady:
                continue
            except MailferryError as exc:
                failed += 1
                echo(f"{m.address}: prestage failed: {exc}")
            else:
                echo(f"{m.address}: prestaged ({detail.get('copied', 0)} copied, "
                     f"{detail.get('present', 0)} present)")
            del pending[m.id]
        if pending:
            queue.wait(lambda: False, timeout=5.0)
    return failed
