"""Every step the engine runs, with how long and how often it may fail before it is
permanent: one table, so the error model of a step is read in one place (like kopf's
handler options `retries`, `timeout` and `backoff`).

Why limits at all. A step that keeps failing temporarily (a server down, a lock held) is
retried with a growing back-off; but retrying forever hides a broken setup behind a plan
that always says "retry after error", and a bug (any exception that is not one of
`reconciler.errors`) is not going to fix itself. So each step has:

- `retries`: temporary errors in a row after which the step fails permanently;
- `timeout`: seconds since the first of those errors after which it fails permanently
  (kopf's `timeout`: the time the step may take to succeed, not one attempt's);
- `backoff`: the first delay (a TemporaryError's own `delay` wins when larger), doubled on
  every attempt up to `max_backoff`;
- `bug_retries`: attempts an *unexpected* exception gets (a bug, or a driver error nobody
  classified): a few, for a flaky moment, then permanent with its type and text.

Never-permanent steps (`retries=None`, `timeout=None`) are the ones between the hold and
the flip (E5, E9): there the addresses are held in fed and their mail waits. Freezing the
migration would leave the mail waiting until an admin came; retrying until fed answers
delivers it as soon as it can (DESIGN.md: the hold is short and always ends in a flip).

A permanent failure freezes the migration with the reason (`failed_reason`); the plan shows
it as a `!` line and `reconcile retry ADDRESS` clears it.

Every step is here, and the engine runs every change through this table (`step_for`): the
steps of a recorded migration (E2-E41, and E43, the purge of a finished record, which the
engine finds due itself), and the two that come before any migration row, `create` (a new
address) and `E1` (record the migration). What a step runs on is the spec's `run`, made by
`on_migration` or `on_address`: they fetch the row or the desired mailbox and skip a change
the world has moved past since it was planned. A name not in the table is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from mailferry.mail.backoff import backoff as exponential_backoff
from reconciler.errors import PermanentError
from reconciler.plan import Change
from reconciler.state.model import AddressError, Migration
from reconciler.steps import cleanup, cutover, prestage, station, transfer
from reconciler.steps.base import AddressStep, DataPart, MigrationStep, Outcome, StepContext

HOUR = 3600.0

# A planned change run in the step's session: its outcome, or None when the world moved
# past the plan since (nothing to record).
StepRun = Callable[[StepContext, Change], Outcome | None]


def on_migration(step: MigrationStep) -> StepRun:
    """A step of a recorded migration: it runs on the row the plan saw, if that row is still
    in the planned state, neither frozen nor purged (else someone else moved it since)."""
    def run(ctx: StepContext, change: Change) -> Outcome | None:
        m = current_row(ctx.session, change)
        return None if m is None else replace(step(ctx, m), migration=m)
    return run


def current_row(session: Session, change: Change) -> Migration | None:
    """The migration `change` was planned on, if it is still in the planned state, neither
    frozen nor purged (else None: someone else moved it since)."""
    m = session.get(Migration, change.migration_id)
    if m is None or m.state != change.state or m.failed or m.purged:
        return None
    return m


def on_address(step: AddressStep) -> StepRun:
    """A step before any migration row (`create`, `E1`): it runs on the address's desired
    mailbox, unless the address's earlier failure is frozen or still backing off (a saved
    plan made before it). That failure's record goes with the success, not before it."""
    def run(ctx: StepContext, change: Change) -> Outcome | None:
        known = ctx.cache.address_errors  # (None: look; else only where the pass saw one)
        error = ctx.session.get(AddressError, change.address) \
            if known is None or change.address in known else None
        if error is not None:
            if error.failed_reason is not None or (
                    error.next_attempt_at is not None and error.next_attempt_at > ctx.now):
                return None
            ctx.session.delete(error)
        if ctx.desired is None:
            raise PermanentError("the address is not in the specs", address=change.address,
                                 step=change.step or "")
        return step(ctx, ctx.desired)
    return run


@dataclass(frozen=True)
class StepSpec:
    """One step: what runs it and its error limits (the module docstring)."""

    name: str
    run: StepRun
    retries: int | None = 20
    timeout: float | None = 6 * HOUR
    backoff: float = 5.0
    max_backoff: float = 300.0
    bug_retries: int | None = 3  # None: like any temporary error

    def delay(self, attempts: int, suggested: float | None = None) -> float:
        """Seconds before attempt `attempts + 1` (`attempts` >= 1 failed so far)."""
        first = max(self.backoff, suggested or 0.0)
        return exponential_backoff(attempts, first, self.max_backoff, jitter=False)

    def exhausted(self, attempts: int, failing_for: float, *, bug: bool) -> str | None:
        """Why the step is now permanent after `attempts` errors over `failing_for`
        seconds, or None while it may still be retried."""
        if bug and self.bug_retries is not None and attempts >= self.bug_retries:
            return f"an unexpected error, {attempts} times in a row (a bug? see the log)"
        if self.retries is not None and attempts >= self.retries:
            return f"failed {attempts} times in a row"
        if self.timeout is not None and failing_for >= self.timeout:
            return (f"still failing after {failing_for / HOUR:.1f} h "
                    f"(limit {self.timeout / HOUR:g} h)")
        return None


def _specs(*specs: StepSpec) -> dict[str, StepSpec]:
    return {spec.name: spec for spec in specs}


STEPS: dict[str, StepSpec] = _specs(
    StepSpec("create", on_address(prestage.create_mailbox)),
    StepSpec("E1", on_address(prestage.e1_record_migration)),
    StepSpec("E2", on_migration(prestage.e2_create_target)),
    StepSpec("E20", on_migration(station.e20_first_check), timeout=24 * HOUR),
    StepSpec("E21", on_migration(station.e21_schedule_recheck), timeout=24 * HOUR),
    StepSpec("E22", on_migration(station.e22_second_check), timeout=24 * HOUR),
    StepSpec("E4", on_migration(cutover.e4_form_addresses)),
    # Held: retried until fed answers, never frozen (the module docstring).
    StepSpec("E5", on_migration(cutover.e5_verify_and_hold), retries=None, timeout=None,
             bug_retries=None, max_backoff=30.0, backoff=2.0),
    StepSpec("E9", on_migration(cutover.e9_flip), retries=None, timeout=None,
             bug_retries=None, max_backoff=30.0, backoff=2.0),
    StepSpec("E11", on_migration(transfer.e11_take_mailbox)),
    # A copy of a big mailbox meets every kind of hiccup: more patience.
    StepSpec("E15", on_migration(transfer.e15_copy_mail), retries=50, timeout=24 * HOUR),
    StepSpec("E16", on_migration(transfer.e16_take_diary)),
    StepSpec("E17", on_migration(transfer.e17_copy_diary), retries=50, timeout=24 * HOUR),
    StepSpec("E30", on_migration(station.e30_local_data), timeout=24 * HOUR),
    StepSpec("E40", on_migration(cleanup.e40_done), timeout=24 * HOUR),
    StepSpec("E41", on_migration(cleanup.e41_delete_source), timeout=24 * HOUR),
    StepSpec("E43", on_migration(cleanup.e43_purge), timeout=24 * HOUR),
)


# The data parts a worker may run for a step (`StepContext.data`): the copies and their
# verification, E12's validation, the final delta before E41, the diary merge.
DATA_PARTS: dict[str, DataPart] = {
    "E11": transfer.validate_part,
    "E15": transfer.copy_mail_part,
    "E17": transfer.copy_diary_part,
    "E41": cleanup.final_delta_part,
    "prestage": transfer.prestage_part,  # no step of the engine: `reconcile prestage --workers`
}


def step_for(name: str | None) -> StepSpec:
    """The registered step `name`; a name the table does not have is refused, permanently
    (a plan naming it is a bug or a hand-edited file: nothing is run for it)."""
    spec = STEPS.get(name or "")
    if spec is None:
        raise PermanentError(f"no step {name!r} in the registry", step=name or "")
    return spec
