"""Prestage: move the bulk of the old mail days before the cutover, without changing state.

Why a side activity and not a state of the machine: the patent copies old mail after the
directory flip (E9 -> E15), which puts the whole mailbox on the critical path of the
window. But BOX2 exists from E2 on (state 1, "prestage"), days earlier, and copying into it
is harmless: the copy only appends, and BOX2 is not yet anyone's mailbox. So, for every
migration in states 1-6 whose policy says ``prestageCopy: true`` (or all with
``--all``), the mover copies BOX1 -> BOX2 under the migration's own manifest key; E15 after
the flip then finds the bulk present (listing only) and copies the delta, as fast as the
delta is small. The state never changes here; each pass is recorded as an event
``PRESTAGE`` (no from/to state) and a `transfer_runs` row with phase ``prestage``, so the
history shows it and `--plan` learns the throughput.

Run it from cron or by hand during the nights before a window:
``python -m reconciler.mover prestage --specs specs --state var/state.db``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from sqlalchemy import select

from reconciler.drivers.base import MailSystemDriver
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport
from reconciler.mover.progress import Progress
from reconciler.mover.runner import Job, run_job
from reconciler.mover.service import endpoint_for, options_from_modes, throttle_for
from reconciler.state.model import Migration
from reconciler.state.store import Store, record_event

PRESTAGE_STATES = (1, 2, 3, 4, 5, 6)


def due(store: Store, *, everything: bool = False) -> list[Migration]:
    """Migrations whose BOX2 exists, before the flip, with a copy mode (and prestageCopy)."""
    with store.session() as session:
        rows = session.scalars(select(Migration).where(
            Migration.state.in_(PRESTAGE_STATES), Migration.failed_reason.is_(None),
            Migration.purged.is_(False)).order_by(Migration.id)).all()
    return [m for m in rows if m.modes.copies_mail and (everything or m.modes.prestage_copy)]


async def _prestage(store: Store, drivers: Mapping[str, MailSystemDriver],
                    migrations: list[Migration], parallel: int,
                    progress: Progress) -> list[MailboxReport]:
    gate = asyncio.Semaphore(max(1, parallel))
    progress.run_started(len(migrations))

    async def one(m: Migration) -> MailboxReport:
        src, dst = drivers[m.source_system], drivers[m.target_system]
        job = Job(m.address, lambda: endpoint_for(src, m.source_mailbox, readonly=True),
                  lambda: endpoint_for(dst, m.target_mailbox, readonly=False),
                  throttle=throttle_for(m.source_system, m.modes),
                  options=options_from_modes(m.modes, "prestage"))
        async with gate:
            report = await run_job(job, Manifest(store, m.id), progress, retries=2)
        with store.session() as session:
            record_event(session, m, "PRESTAGE", detail={
                k: v for k, v in report.as_dict().items() if k != "folders"})
        return report

    reports = await asyncio.gather(*(one(m) for m in migrations))
    progress.run_done()
    return list(reports)


def prestage(store: Store, drivers: Mapping[str, MailSystemDriver], *, everything: bool = False,
             parallel: int = 4, progress: Progress | None = None) -> list[MailboxReport]:
    """Copy every due migration's mailbox now; one report each."""
    migrations = [m for m in due(store, everything=everything)
                  if m.source_system in drivers and m.target_system in drivers]
    return asyncio.run(_prestage(store, drivers, migrations, parallel, progress or Progress()))
