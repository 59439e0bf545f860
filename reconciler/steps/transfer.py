"""E11-E19: the data mover takes the mailbox and copies old mail and diary data.

E11/E12 validate the source first when the mode asks for it; E13/E14 hand the mailbox to the
mover only if its address migrated (an address-migration id exists), otherwise E16/E17 move
only the diary data. E15 copies and then verifies: the state advances only when every source
message is proven present in BOX2. The copy compares contents, so a re-run after a crash
copies only what is missing (invariant 3).
"""

from __future__ import annotations

from reconciler.errors import PermanentError, TemporaryError
from reconciler.mover.copy import copy_mailbox
from reconciler.mover.validate import validate_source
from reconciler.state.model import Migration, TransferManifest, TransferRun
from reconciler.steps.base import Outcome, StepContext


def e11_take_mailbox(ctx: StepContext, m: Migration) -> Outcome:
    """E11-E14: validate the source if asked, check the address migrated, take the mailbox."""
    detail: dict[str, object] = {}
    if m.modes.get("dataTransfer") == "validate-and-copy":  # E11 yes -> E12
        problems = validate_source(ctx.driver(m.source_system), m.source_mailbox)
        if problems:
            raise PermanentError("source data failed validation (E12): " + "; ".join(problems[:5]),
                                 address=m.address, step="E12")
        detail["validated"] = True
    if m.address_migration_id is None:  # E14 negative with mail transfer: not ours to copy
        raise PermanentError("no address-migration id: E9 was not recorded",
                             address=m.address, step="E14")
    detail["address_migration_id"] = m.address_migration_id
    return Outcome(7, "E11-E14", detail)


def e16_take_diary(ctx: StepContext, m: Migration) -> Outcome:
    """E13/E14 negative/E16: the address does not move; the mover takes the diary data."""
    ctx.driver(m.source_system).ping()
    return Outcome(7, "E13-E16", {"diary_only": True})


def _copy(ctx: StepContext, m: Migration, *, mail: bool, label: str) -> Outcome:
    diary = bool(m.modes.get("diary", True)) or not mail
    manifest: list[TransferManifest] = []

    def remember(msg: object, copied: bool) -> None:
        manifest.append(TransferManifest(
            migration_id=m.id, folder=getattr(msg, "folder", ""), sha256=getattr(msg, "sha256", ""),
            size=getattr(msg, "size", 0), message_id=getattr(msg, "message_id", None),
            copied=copied, at=ctx.now,
        ))

    report = copy_mailbox(ctx.driver(m.source_system), m.source_mailbox,
                          ctx.driver(m.target_system), m.target_mailbox,
                          mail=mail, diary=diary, on_message=remember)
    ctx.session.add_all(manifest)
    ctx.session.add(TransferRun(
        migration_id=m.id, copied=report.copied, present=report.present,
        failed=len(report.failed), bytes_copied=report.bytes_copied, seconds=report.seconds,
        verified=report.verified, at=ctx.now,
    ))
    detail = {"copied": report.copied, "present": report.present, "failed": len(report.failed),
              "bytes": report.bytes_copied, "verified": report.verified}
    if not report.verified:
        # Keep the figures (the manifest and run rows commit with the error record) and retry.
        ctx.session.flush()
        raise TemporaryError(
            f"copy not verified: {len(report.missing)} source messages missing in BOX2, "
            f"{len(report.failed)} failed" + (f" (first: {report.failed[0]})" if report.failed
                                              else ""),
            address=m.address, step=label, delay=10)
    return Outcome(8, label, detail)


def e15_copy_mail(ctx: StepContext, m: Migration) -> Outcome:
    """E15 (+E17): old mail and diary data copied and verified."""
    return _copy(ctx, m, mail=True, label="E15")


def e17_copy_diary(ctx: StepContext, m: Migration) -> Outcome:
    """E17 alone: diary data copied (diary-only mode)."""
    return _copy(ctx, m, mail=False, label="E17")
