"""E11-E19: the data mover takes the mailbox and copies old mail and diary data.

E11/E12 validate the source first when the mode asks for it; E13/E14 hand the mailbox to the
mover only if its address migrated (an address-migration id exists), otherwise E16/E17 move
only the diary data. E15 copies and then verifies: the state advances only when every source
message is proven present in BOX2. The copy compares contents, so a re-run after a crash
copies only what is missing (invariant 3). The copy itself is the data mover's pipeline
(`reconciler.mover.service`): IMAP when the drivers offer it, the manifest kept in the
state store, the policy's folderMap, throttle and verify mode applied.
"""

from __future__ import annotations

from reconciler.errors import PermanentError, TemporaryError, Throttled, Waiting
from reconciler.mover.calendar import copy_diary, verify_diary
from reconciler.mover.service import move_mail
from reconciler.mover.validate import validate_source
from reconciler.state.model import Migration, TransferRun
from reconciler.state.states import MigrationState
from reconciler.steps.base import Outcome, StepContext

ALTERED_DELAY = 300.0  # seconds before looking again at a target that altered copies


def accepted_rewrites(ctx: StepContext, m: Migration) -> frozenset[str] | None:
    """The store rewrites the policy accepts for the target, from the specs as they are
    now (like deleteSource's consent: withdrawing an acceptance counts at once); None
    without specs (the recorded modes are used)."""
    if ctx.desired is None:
        return None
    return ctx.desired.policy.accepted_rewrites(m.target_system)


def validate_part(ctx: StepContext, m: Migration) -> dict[str, object]:
    """E12, the data part of E11: the source's data validated (a worker may run it)."""
    problems = validate_source(ctx.driver(m.source_system), m.source_mailbox)
    if problems:
        raise PermanentError("source data failed validation (E12): " + "; ".join(problems[:5]),
                             address=m.address, step="E12")
    return {"validated": True}


def e11_take_mailbox(ctx: StepContext, m: Migration) -> Outcome:
    """E11-E14: validate the source if asked, check the address migrated, take the mailbox."""
    detail: dict[str, object] = {}
    if m.modes.data_transfer == "validate-and-copy":  # E11 yes -> E12
        detail.update(ctx.data(m, "E11", validate_part))
    if m.address_migration_id is None:  # E14 negative with mail transfer: not ours to copy
        raise PermanentError("no address-migration id: E9 was not recorded",
                             address=m.address, step="E14")
    detail["address_migration_id"] = m.address_migration_id
    return Outcome(MigrationState.MOVER_TOOK, "E11-E14", detail)


def e16_take_diary(ctx: StepContext, m: Migration) -> Outcome:
    """E13/E14 negative/E16: the address does not move; the mover takes the diary data."""
    ctx.driver(m.source_system).ping()
    return Outcome(MigrationState.MOVER_TOOK, "E13-E16", {"diary_only": True})


def _copy(ctx: StepContext, m: Migration, *, mail: bool, label: str) -> dict[str, object]:
    diary = m.modes.diary or not mail
    src, dst = ctx.driver(m.source_system), ctx.driver(m.target_system)
    detail: dict[str, object] = {"copied": 0, "present": 0, "failed": 0, "bytes": 0}
    problems: list[str] = []
    if mail:
        # The manifest rows and the run's figures are written in this step's transaction:
        # kept with the event on success, with the error record on failure (in a worker:
        # committed as the copy goes, see StepContext.manifest).
        report = move_mail(src, m.source_mailbox, dst, m.target_mailbox, key=m.address,
                           modes=m.modes, phase="copy", manifest=ctx.manifest(m),
                           progress=ctx.progress, accepted=accepted_rewrites(ctx, m),
                           throttle=ctx.pace(m.source_system, m) if ctx.pace else None)
        detail.update(copied=report.copied, present=report.present, failed=report.failed,
                      bytes=report.bytes_copied, missing=report.missing,
                      altered=report.altered, equivalent=report.equivalent,
                      throttled=report.throttled)  # attempts a busy system refused
        if report.resume_at is not None:
            # A system's daily budget is spent: what fitted is copied; the rest waits for
            # the next day, without counting as an error (the plan shows this reason).
            ctx.session.flush()
            wait = max(60.0, (report.resume_at - ctx.now).total_seconds())
            raise Waiting(f"waiting: {report.error}", address=m.address, step=label,
                          delay=wait)
        if report.retry_in is not None:
            # Still throttled after the copy's own retries: the system needs a longer rest.
            ctx.session.flush()
            raise Throttled(f"copy paused: {report.error}", address=m.address, step=label,
                            delay=max(60.0, report.retry_in))
        if report.altered:
            # Not a retry that might heal by itself: the admin must fix the server or
            # accept the equivalence; the plan shows this reason while it waits.
            ctx.session.flush()
            raise TemporaryError(f"copy not verified: {report.alteration()}",
                                 address=m.address, step=label, delay=ALTERED_DELAY)
        if not report.verified:
            first = next(((f.folder, u, r) for f in report.folders for u, r in f.failed), None)
            problems.append(f"{report.missing} source messages not proven in BOX2, "
                            f"{report.failed} failed" + (f" (first: {first})" if first else "")
                            + (f", error: {report.error}" if report.error else ""))
    if diary:
        detail["diary_changes"] = copy_diary(src, m.source_mailbox, dst, m.target_mailbox)
        lacking = verify_diary(src, m.source_mailbox, dst, m.target_mailbox)
        if lacking:
            problems.append(f"{len(lacking)} diary entries missing in BOX2")
        if not mail:
            ctx.session.add(TransferRun(migration_id=m.id, mailbox=m.address, phase="diary",
                                        verified=not lacking, at=ctx.now))
    detail["verified"] = not problems
    if problems:
        ctx.session.flush()
        raise TemporaryError("copy not verified: " + "; ".join(problems),
                             address=m.address, step=label, delay=10)
    return detail


def copy_mail_part(ctx: StepContext, m: Migration) -> dict[str, object]:
    """The data part of E15: old mail (and diary data) copied and verified."""
    return _copy(ctx, m, mail=True, label="E15")


def copy_diary_part(ctx: StepContext, m: Migration) -> dict[str, object]:
    """The data part of E17: diary data copied and verified."""
    return _copy(ctx, m, mail=False, label="E17")


def e15_copy_mail(ctx: StepContext, m: Migration) -> Outcome:
    """E15 (+E17): old mail and diary data copied and verified."""
    return Outcome(MigrationState.DATA_COPIED, "E15", ctx.data(m, "E15", copy_mail_part))


def e17_copy_diary(ctx: StepContext, m: Migration) -> Outcome:
    """E17 alone: diary data copied (diary-only mode)."""
    return Outcome(MigrationState.DATA_COPIED, "E17", ctx.data(m, "E17", copy_diary_part))


def prestage_part(ctx: StepContext, m: Migration) -> dict[str, object]:
    """Prestage (states 1-6, no transition): the bulk of BOX1 copied into BOX2 before the
    cutover (`reconciler.mover.prestage`), as a worker runs it for `reconcile prestage
    --workers`; E15 then copies the delta."""
    report = move_mail(ctx.driver(m.source_system), m.source_mailbox,
                       ctx.driver(m.target_system), m.target_mailbox, key=m.address,
                       modes=m.modes, phase="prestage", manifest=ctx.manifest(m),
                       accepted=accepted_rewrites(ctx, m),
                       throttle=ctx.pace(m.source_system, m) if ctx.pace else None)
    return {k: v for k, v in report.as_dict().items() if k != "folders"}
