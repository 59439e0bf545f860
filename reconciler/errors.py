"""The reconciler's small error hierarchy.

Modelled on kopf: an error is either *temporary* (the world is not ready yet, a server is
down, a lock is held: retry after a delay, the migration keeps its state) or *permanent*
(the patent says stop: a negative E8 verification, a negative second station check, E32
exhausted; the migration is frozen as failed with the reason until an admin acts).
Step code raises these; the engine turns them into back-off or a `failed` record. Anything
else escaping a step is an unexpected error (a bug, or a driver error nobody classified): it
is logged with its traceback and retried a few times, then permanent -- it must never
silently advance or drop a migration, nor be retried forever. How often and how long each
step may fail before it is permanent is `reconciler.steps.registry`.

`LeaseLost` is neither: fed refused a call because another reconciler holds a newer lease
(the fencing token, docs/fed-api.md). This reconciler must stop acting at once and record
nothing: the migration is fine, it is just not ours any more.
"""

from __future__ import annotations


class MailferryError(Exception):
    """Base of every error mailferry raises on purpose."""


class SpecError(MailferryError):
    """The spec set is invalid; `problems` lists every finding (file:line: field: message)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StepError(MailferryError):
    """A step could not complete; says which address and which patent step."""

    def __init__(self, message: str, *, address: str = "", step: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.step = step

    def __str__(self) -> str:
        where = " ".join(part for part in (self.address, self.step) if part)
        base = super().__str__()
        return f"{where}: {base}" if where else base


class TemporaryError(StepError):
    """Retry later; `delay` seconds is the suggested back-off."""

    def __init__(
        self, message: str, *, delay: float = 5.0, address: str = "", step: str = ""
    ) -> None:
        super().__init__(message, address=address, step=step)
        self.delay = delay


class Throttled(TemporaryError):
    """A mail system answered that it is busy or that we use too much of it (`NO [LIMIT]`,
    `[THROTTLED]`, `[UNAVAILABLE]`, an early `BYE`, "too many connections") more often than
    one copy retries: not a failure of the migration, retried after `delay` (the data
    mover's pace for that system has slowed down meanwhile)."""


class Waiting(TemporaryError):
    """Not an error: a limit in the specs says wait until `delay` has passed (a system's
    daily byte budget is spent). The step is retried then; the wait does not count
    against the step's retries or timeout, and the plan shows why it waits."""


class PermanentError(StepError):
    """Stop this migration: it is recorded as failed with this reason and needs an admin."""


class ManualStep(TemporaryError):
    """A person must act first (mailferry cannot do it, by design): `task` says what, in
    the plan's words ("provision jane@corp.example on hosted365"). The migration keeps its
    state in a state of its own (`Migration.manual_step`), rechecked every `delay` seconds
    and never exhausted like an error: the steps after it wait as long as it takes."""

    def __init__(self, task: str, why: str = "", *, delay: float = 30.0, address: str = "",
                 step: str = "") -> None:
        super().__init__(f"manual step: {task}" + (f" ({why})" if why else ""), delay=delay,
                         address=address, step=step)
        self.task = task
        self.why = why


class NotReady(TemporaryError):
    """A precondition is not met yet (a station has not reported, a window is closed)."""


class LeaseLost(MailferryError):
    """Another reconciler took the lease over: fed refused our older fencing token."""
