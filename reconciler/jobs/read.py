"""Reading the workers' data jobs for `reconciler.jobs.view`: three small queries.

- the rows of `data_jobs` a worker took (running, or a result not yet recorded), with
  their migration's systems: as many as the fleet runs at once, a few hundred at most;
- the queued rows counted per source system, target system and step (one `GROUP BY`: a
  wave of 100,000 mailboxes queued is 100,000 rows counted in the database, not read);
- the workers of `data_workers`;

and, on PostgreSQL when a running row names procrastinate's job, that job's status: a job
handed back to the queue (`todo`) or ended without a result is run by nobody, whatever the
row still says. With SQLite (no workers) the two tables are empty and procrastinate's are
not there: nothing else is read.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from reconciler.jobs.view import JobFact, JobFacts, QueuedFact, WorkerFact
from reconciler.state.model import DataJob, DataWorker, Migration
from reconciler.state.store import Store


def read_jobs(store: Store) -> JobFacts:
    """The facts of the workers' data jobs now."""
    with store.session() as session:
        taken = session.execute(
            select(DataJob, Migration.source_system, Migration.target_system)
            .outerjoin(Migration, Migration.id == DataJob.migration_id)
            .where(DataJob.status != "queued")).all()
        queued = session.execute(
            select(Migration.source_system, Migration.target_system, DataJob.step,
                   func.count(), func.min(DataJob.enqueued_at))
            .join(Migration, Migration.id == DataJob.migration_id)
            .where(DataJob.status == "queued")
            .group_by(Migration.source_system, Migration.target_system, DataJob.step)).all()
        workers = session.scalars(select(DataWorker)).all()
        ids = [row.job_id for row, _, _ in taken
               if row.status == "running" and row.job_id is not None]
        live = _running_jobs(session, ids)
        return JobFacts(
            jobs=tuple(JobFact(
                address=row.address, step=row.step, status=row.status, worker=row.worker,
                attempts=row.attempts, enqueued_at=row.enqueued_at, started_at=row.started_at,
                finished_at=row.finished_at, source=source, target=target,
                abandoned=row.status == "running" and row.job_id is not None
                and live is not None and row.job_id not in live)
                for row, source, target in taken),
            queued=tuple(QueuedFact(str(source), str(target), str(step), int(count), oldest)
                         for source, target, step, count, oldest in queued),
            workers=tuple(WorkerFact(w.name, w.host, w.pid, w.concurrency, w.heartbeat,
                                     w.stalled, w.started_at, w.last_seen) for w in workers))


def _running_jobs(session: Session, ids: list[int]) -> set[int] | None:
    """Which of procrastinate's jobs `ids` a worker is running (`doing`); None when that
    cannot be known (no ids, not PostgreSQL, no procrastinate tables)."""
    if not ids or session.get_bind().dialect.name != "postgresql":
        return None
    if session.scalar(text("SELECT to_regclass('procrastinate_jobs')")) is None:
        return None
    return set(session.scalars(text(
        "SELECT id FROM procrastinate_jobs WHERE id = ANY(:ids) AND status = 'doing'"),
        {"ids": ids}))
