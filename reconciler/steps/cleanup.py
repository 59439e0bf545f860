"""E40-E43: done, delete the old mailbox (guarded), purge old records.

E41 is the only step that destroys data. It runs only when the specs' policy says so
(`deleteSource: {after: ..., consent: true}`: the consent is read from the specs as they
are now, so withdrawing it stops a pending deletion) and, when data transfer was on, only
after a last copy pass and a verification that every message of BOX1 is present in BOX2.
"""

from __future__ import annotations

from sqlalchemy import select

from reconciler.errors import NotReady, TemporaryError
from reconciler.mover.calendar import copy_diary, verify_diary
from reconciler.mover.service import forget_logins, move_mail
from reconciler.state.model import Migration, TransferRun
from reconciler.state.states import MigrationState
from reconciler.steps.base import Outcome, StepContext
from reconciler.steps.transfer import ALTERED_DELAY, accepted_rewrites


def e40_done(ctx: StepContext, m: Migration) -> Outcome:
    """E40: addresses and data done, as the modes require."""
    if m.modes.copies_mail or m.modes.diary_only:
        verified = ctx.session.scalars(
            select(TransferRun.id).where(TransferRun.migration_id == m.id,
                                         TransferRun.verified.is_(True)).limit(1)).first()
        if verified is None:
            raise TemporaryError("no verified transfer recorded", address=m.address, step="E40")
    return Outcome(MigrationState.DONE, "E40", {})


def final_delta_part(ctx: StepContext, m: Migration) -> dict[str, object]:
    """The data part of E41: the last delta copy and the verification that every message
    of BOX1 is in BOX2 (a worker may run it; the deletion stays with the reconciler)."""
    source, target = ctx.driver(m.source_system), ctx.driver(m.target_system)
    report = move_mail(source, m.source_mailbox, target, m.target_mailbox,
                       key=m.address, modes=m.modes, phase="final", manifest=ctx.manifest(m),
                       accepted=accepted_rewrites(ctx, m),
                       throttle=ctx.pace(m.source_system, m) if ctx.pace else None)
    lacking: list[str] = []
    if m.modes.diary:
        copy_diary(source, m.source_mailbox, target, m.target_mailbox)
        lacking = verify_diary(source, m.source_mailbox, target, m.target_mailbox)
    if report.altered:
        # Never delete on a copy the target changed: the only intact copy is BOX1.
        ctx.session.flush()
        raise TemporaryError(f"refusing to delete BOX1: {report.alteration()}",
                             address=m.address, step="E41", delay=ALTERED_DELAY)
    if not report.verified or lacking:
        ctx.session.flush()  # keep the failed run's figures with the error record
        raise TemporaryError(
            f"refusing to delete BOX1: {report.missing} of its messages not proven "
            f"in BOX2 ({report.failed} failed"
            + (f", {report.error}" if report.error else "") + ")"
            + (f", {len(lacking)} diary entries missing" if lacking else ""),
            address=m.address, step="E41", delay=30)
    return {"last_delta_copied": report.copied}


def e41_delete_source(ctx: StepContext, m: Migration) -> Outcome:
    """E41/E42: last delta copy, verification, then BOX1 (and its redirect) deleted."""
    if ctx.desired is None or not ctx.desired.policy.delete_consent:  # the plan refuses it too
        raise NotReady("deleting the old mailbox needs deleteSource.consent in the specs",
                       address=m.address, step="E41")
    source = ctx.driver(m.source_system)
    detail: dict[str, object] = {"mailbox": m.source_mailbox}
    if source.get_account(m.source_mailbox) is not None:
        if m.modes.copies_mail:
            detail.update(ctx.data(m, "E41", final_delta_part))
        forget_logins(source, m.source_mailbox)  # pooled sessions of BOX1 must not outlive it
        source.delete_mailbox(m.source_mailbox)
    ctx.changed(m.source_system)  # the pass's closing up-sync makes fed forget ADP1
    return Outcome(MigrationState.SOURCE_DELETED, "E41-E42", detail)


def e43_purge(ctx: StepContext, m: Migration) -> Outcome:
    """E43: a finished record past its retention is purged (the engine finds it due; its
    events are kept). The state stays 13: the event goes from 13 to 13."""
    m.purged = True
    return Outcome(MigrationState.SOURCE_DELETED, "E43")
