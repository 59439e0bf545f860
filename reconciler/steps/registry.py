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
"""

from __future__ import annotations

from dataclasses import dataclass

from mailferry.mail.backoff import backoff as exponential_backoff
from reconciler.steps import cleanup, cutover, prestage, station, transfer
from reconciler.steps.base import StepFunction

HOUR = 3600.0


@dataclass(frozen=True)
class StepSpec:
    """One step: what runs it and its error limits (the module docstring)."""

    name: str
    run: StepFunction | None  # None: `create` and `E1`, which have no migration row yet
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
    StepSpec("create", None),
    StepSpec("E1", None),
    StepSpec("E2", prestage.e2_create_target),
    StepSpec("E20", station.e20_first_check, timeout=24 * HOUR),
    StepSpec("E21", station.e21_schedule_recheck, timeout=24 * HOUR),
    StepSpec("E22", station.e22_second_check, timeout=24 * HOUR),
    StepSpec("E4", cutover.e4_form_addresses),
    # Held: retried until fed answers, never frozen (the module docstring).
    StepSpec("E5", cutover.e5_verify_and_hold, retries=None, timeout=None, bug_retries=None,
             max_backoff=30.0, backoff=2.0),
    StepSpec("E9", cutover.e9_flip, retries=None, timeout=None, bug_retries=None,
             max_backoff=30.0, backoff=2.0),
    StepSpec("E11", transfer.e11_take_mailbox),
    # A copy of a big mailbox meets every kind of hiccup: more patience.
    StepSpec("E15", transfer.e15_copy_mail, retries=50, timeout=24 * HOUR),
    StepSpec("E16", transfer.e16_take_diary),
    StepSpec("E17", transfer.e17_copy_diary, retries=50, timeout=24 * HOUR),
    StepSpec("E30", station.e30_local_data, timeout=24 * HOUR),
    StepSpec("E40", cleanup.e40_done, timeout=24 * HOUR),
    StepSpec("E41", cleanup.e41_delete_source, timeout=24 * HOUR),
)
