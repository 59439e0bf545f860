"""`reconcile worker`: a process that takes data jobs from the queue and runs them.

A worker needs the specs (for the systems' drivers and the policies), the state store's
PostgreSQL and IMAP (or the drivers' own) access to the systems; nothing else, not fed.
Each job (`run_data_job`) is one data part of one migration (registry.DATA_PARTS):

1. it marks its `data_jobs` row `running` (or finds it finished, or gone: nothing to do);
2. on its own connection (`fleet.Guard`) it takes the mailbox's lock, then a slot of the
   source system and one of the target (each system's `maxParallel`, for all workers);
3. it runs the part as the reconciler would, with the manifest committed batch by batch
   and the fleet's pace of the source system: a copy killed here resumes from the manifest
   on the next worker, and nothing is copied twice (the mover compares contents);
4. it writes the result (the event's detail, or the error) into the row, only while the
   row is still its own attempt, and NOTIFYs the reconciler.

The worker keeps its named row in `data_workers` (`roster`: when it was last seen, its
lease), so that the status page and `reconcile status` can say who runs what.

It changes no migration state: the reconciler turns the result into the transition.

A killed worker (SIGKILL, a host gone) stops sending procrastinate's heartbeat; every other
worker looks for jobs whose worker's heartbeat is older than `stalled` seconds and hands
them back to the queue (procrastinate's stalled-job retry), where another worker takes
them. Its guard connection is gone with it, so its locks are free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from procrastinate import App, JobContext
from sqlalchemy import text, update

from reconciler.drivers.base import MailSystemDriver
from reconciler.drivers.registry import make_drivers
from reconciler.fedclient import FedClient
from reconciler.lease import holder_id
from reconciler.mover.service import share_paces
from reconciler.spec.model import DesiredMailbox, SpecSet
from reconciler.state.model import DataJob, Migration, utcnow
from reconciler.state.store import Store
from reconciler.steps.base import PassCache, StepContext
from reconciler.steps.registry import DATA_PARTS
from reconciler.workers import roster
from reconciler.workers.fleet import FleetPace, Guard, SharedPace
from reconciler.workers.queue import (
    CHANNEL,
    QUEUE,
    TASK,
    conninfo,
    ensure_schema,
    error_result,
    make_app,
)

log = logging.getLogger("mailferry.worker")


@dataclass
class Runtime:
    """What a worker process's jobs share."""

    specs: SpecSet
    store: Store
    drivers: dict[str, MailSystemDriver]
    name: str = field(default_factory=holder_id)
    ping: float = 1.0  # the guard's watchdog period
    stopping: threading.Event = field(default_factory=threading.Event)
    desired: dict[str, DesiredMailbox] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.desired = self.specs.desired()  # once: a wave has thousands of mailboxes

    def pace(self, guard: Guard) -> Any:
        """The fleet's pace of a system, for the copies of the job on `guard`."""
        def pace_of(system: str, m: Migration) -> FleetPace:
            return FleetPace(self.store.engine, system, m.modes.throttle_messages_per_second,
                             m.modes.throttle_bytes_per_second, lost=guard.lost)
        return pace_of


def _claim(rt: Runtime, migration_id: int, step: str, state: int,
           job_id: int | None = None) -> tuple[int, int] | None:
    """Mark the row running for this worker (and procrastinate's job `job_id` running it):
    (row id, attempt), or None (nothing to do)."""
    with rt.store.session() as session:
        row = session.execute(
            update(DataJob).where(DataJob.migration_id == migration_id, DataJob.step == step,
                                  DataJob.state == state,
                                  DataJob.status.in_(("queued", "running")))
            .values(status="running", worker=rt.name, started_at=utcnow(),
                    attempts=DataJob.attempts + 1, job_id=job_id)
            .returning(DataJob.id, DataJob.attempts)).first()
    return None if row is None else (int(row[0]), int(row[1]))


def _finish(rt: Runtime, row_id: int, attempt: int, status: str,
            result: dict[str, Any]) -> bool:
    """Write the result, if the row is still this attempt's (else another worker took it
    over: its result counts). NOTIFY the reconciler."""
    with rt.store.session() as session:
        done = session.execute(
            update(DataJob).where(DataJob.id == row_id, DataJob.attempts == attempt,
                                  DataJob.worker == rt.name, DataJob.status == "running")
            .values(status=status, result=result, finished_at=utcnow())
            .returning(DataJob.id)).first()
        session.execute(text(f"NOTIFY {CHANNEL}"))
    return done is not None


def run_data_job(rt: Runtime, migration_id: int, step: str, state: int,
                 job_id: int | None = None) -> None:
    """One data job (the module docstring); `job_id`: procrastinate's job running it."""
    claimed = _claim(rt, migration_id, step, state, job_id)
    if claimed is None:
        return
    row_id, attempt = claimed
    part = DATA_PARTS[step]
    with rt.store.session() as session:
        m = session.get(Migration, migration_id)
        if m is None or m.state != state or m.failed_reason is not None:
            _finish(rt, row_id, attempt, "error", {
                "kind": "temporary", "message": "the migration moved on; queued again",
                "delay": 0.0})
            return
        address, source, target = m.address, m.source_system, m.target_system
        limit = m.modes.max_parallel
    guard = Guard(conninfo(rt.store.url), ping=rt.ping, stop=rt.stopping.is_set,
                  name=f"{rt.name} {address} {step}")
    try:
        guard.mailbox(f"{target}/{address}")
        guard.slot(f"source:{source}", limit)
        guard.slot(f"target:{target}", limit)
        started = utcnow()
        with rt.store.session() as session:
            m = session.get(Migration, migration_id)
            assert m is not None
            ctx = StepContext(specs=rt.specs, fed=FedClient(rt.specs.fed.control_url, ""),
                              drivers=rt.drivers, session=session, now=started,
                              cache=PassCache(), desired=rt.desired.get(address),
                              worker=True, pace=rt.pace(guard))
            detail = dict(part(ctx, m))
        detail.update(worker=rt.name, attempt=attempt, copy_started=started.isoformat(),
                      copy_finished=utcnow().isoformat())
        status = "done"
        result: dict[str, Any] = {"detail": detail}
    except Exception as exc:  # every error goes back to the reconciler, classified
        status, result = "error", {**error_result(exc), "worker": rt.name}
    try:
        if not guard.held():
            log.error("%s %s: the database connection broke; stopping", address, step)
            return  # nothing more is written: the job is retried elsewhere
    finally:
        guard.close()
    if not _finish(rt, row_id, attempt, status, result):
        log.warning("%s %s: taken over by another worker; result dropped", address, step)


def worker_app(rt: Runtime) -> App:
    """The procrastinate app with the data task bound to this runtime."""
    app = make_app(rt.store.url)

    @app.task(name=TASK, queue=QUEUE, pass_context=True)
    def data_step(context: JobContext, migration_id: int, step: str, state: int) -> None:
        run_data_job(rt, migration_id, step, state, context.job.id)

    return app


async def _chores(rt: Runtime, app: App, every: float, stalled: float) -> None:
    """Every `every` seconds: this worker's `last_seen` (roster), and the jobs of workers
    whose heartbeat is older than `stalled` handed back to the queue (procrastinate's
    stalled-job retry)."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(roster.touch, rt.store, rt.name)
        except Exception as exc:  # the database may be away for a moment
            log.warning("worker's last_seen not written: %s", exc)
        try:
            jobs = await app.job_manager.get_stalled_jobs(queue=QUEUE,
                                                          seconds_since_heartbeat=stalled)
            for job in jobs:
                with contextlib.suppress(Exception):  # another worker retried it first
                    await app.job_manager.retry_job(job)
                    log.warning("job %s of a stalled worker handed back to the queue", job.id)
        except Exception as exc:  # the database may be away for a moment
            log.warning("stalled-job check failed: %s", exc)


def run_worker(specs: SpecSet, store: Store, *, concurrency: int = 4,
               heartbeat: float = 10.0, stalled: float = 30.0, ping: float = 1.0) -> int:
    """Take jobs until SIGTERM/SIGINT (procrastinate's handlers: the running jobs end)."""
    ensure_schema(store.url)
    rt = Runtime(specs, store, make_drivers(specs), ping=ping)
    roster.register(store, rt.name, concurrency=concurrency, heartbeat=heartbeat,
                    stalled=stalled)
    # Every endpoint's pace shares its back-off with the other workers.
    share_paces(lambda local: SharedPace(local, FleetPace(store.engine, local.system)))
    app = worker_app(rt)

    async def main() -> None:
        # procrastinate runs a sync task in the loop's default executor, which asyncio
        # sizes min(32, cores + 4): on a 2-core host `--concurrency 8` would run 6 jobs at
        # once, the other 2 claimed and waiting for a thread. One thread per job, and one
        # for the chores' database calls.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
            max_workers=concurrency + 1, thread_name_prefix="mailferry-job"))
        async with app.open_async():
            side = asyncio.create_task(_chores(rt, app, heartbeat, stalled))
            try:
                await app.run_worker_async(
                    queues=[QUEUE], concurrency=concurrency, name=rt.name,
                    update_heartbeat_interval=heartbeat, stalled_worker_timeout=stalled,
                    delete_jobs="successful")
            finally:
                rt.stopping.set()
                side.cancel()

    try:
        asyncio.run(main())
    finally:
        with contextlib.suppress(Exception):  # the database away: the row ages out instead
            roster.unregister(store, rt.name)
    return 0
