"""Where every mailbox stands, and the admin's three levers: suspend, resume, retry.

Why: after a few months of GitOps an admin team asks "what is left of wave 3?", "which
mailboxes on s1 are stuck?", "why did bob fail?" — the plan answers with next steps, but an
operator wants a table: address, source -> target, state, what comes next and when, the
last error. `reconcile status` prints it from the same pure plan (so it never disagrees with
`--plan`), joined with the migration records for the errors, filtered by placement, system
or state. With workers (`reconcile worker`, PostgreSQL) it goes on with the data jobs: which
worker runs which mailbox's step since when, its heartbeat, the jobs whose lease expired,
the queued ones per source and target system, and each worker (`reconciler.jobs`).

The levers are state store writes, each recorded as events (so `reconcile events` shows
who paused what, with the specs' commit):

- `suspend PLACEMENT` / `resume PLACEMENT`: a row in `placement_suspensions`; the plan shows
  every mailbox of the placement as suspended and the engine runs none of its steps (a
  step already running finishes). One event for the placement (address
  `placement:NAME`) and one per migration in progress.
- `retry ADDRESS`: a failed migration (E8 negative, E24, E32, ...) is frozen until an admin
  acts; retry clears the failure (and any back-off), so it resumes at its recorded state.
  The engine re-checks the world before acting, as always.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailferry.mail.addresses import address_key
from reconciler.engine import Engine
from reconciler.errors import MailferryError
from reconciler.jobs.read import read_jobs
from reconciler.jobs.view import JobLine, JobsView, age, jobs_view, stamp
from reconciler.output import when
from reconciler.plan import Change, MigrationView, Plan
from reconciler.state.model import AddressError, Migration, PlacementSuspension
from reconciler.state.states import MigrationState
from reconciler.state.store import Store, record_event

STATE_FILTERS = ("failed", "suspended", "pending", "in-sync", "refused", "waiting")


@dataclass(frozen=True)
class StatusRow:
    """One mailbox in the status table."""

    address: str
    placement: str
    source: str
    target: str
    state: str
    action: str
    next: str
    due: str
    last_error: str

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def _row(change: Change, error: str, now: datetime) -> StatusRow:
    state = "-" if change.state is None else str(change.state)
    if change.action == "failed":
        state += " failed"
    nxt = "" if change.action == "in-sync" else f"{change.step or '-'}"
    if change.action in ("refused", "conflict", "orphan", "suspended", "manual"):
        nxt += f" ({change.action})"
    return StatusRow(
        address=change.address, placement=change.placement or "-",
        source=change.source or "(new)", target=change.target or change.source or "-",
        state=state, action=change.action, next=nxt, due=when(change, now),
        last_error=(f"manual step: {change.reason}" if change.action == "manual" else
                    error or (change.reason if change.action in ("failed", "refused",
                                                                  "conflict") else "")),
    )


def _matches(change: Change, state: str | None) -> bool:
    if state is None:
        return True
    if state.isdigit():
        return change.state == int(state)
    if state == "pending":
        return change.action != "in-sync"
    return change.action == state


def check_state_filter(state: str | None) -> None:
    """Refuse an unknown `--state` value (a number or one of STATE_FILTERS)."""
    if state is not None and not state.isdigit() and state not in STATE_FILTERS:
        raise MailferryError(f"unknown state filter {state!r}: a state number or one of "
                             + ", ".join(STATE_FILTERS))


def status_rows(engine: Engine, *, placement: str | None = None, system: str | None = None,
                state: str | None = None,
                unreached: list[str] | None = None) -> list[StatusRow]:
    """The status table, filtered (`state`: a number or one of STATE_FILTERS); what could
    not be reached (fed without its token, say) is added to `unreached`."""
    check_state_filter(state)
    observed = engine.observe(best_effort=True)  # a look, not a change: no fed needed
    if unreached is not None:
        unreached.extend(observed.unreached)
    plan = engine.plan(observed=observed)
    return rows_of(plan, last_errors(observed.migrations), placement=placement, system=system,
                   state=state)


def status_jobs(engine: Engine, rows: list[StatusRow], *, filtered: bool = False,
                system: str | None = None) -> JobsView:
    """The workers' data jobs (of the `rows` shown, when `filtered`), queued counts (from or
    to `system`, if given) and the workers, at the engine's clock."""
    return jobs_view(read_jobs(engine.store), engine.clock(),
                     addresses={r.address for r in rows} if filtered else None, system=system)


def jobs_records(view: JobsView) -> list[dict[str, Any]]:
    """PURE: the JSON Lines of the workers' section (`reconcile status --json`): one
    `job` per job a worker took, one `queued` per source and target system, one `worker`
    per worker; none when the view is empty."""
    return ([{"type": "job", **j.as_dict()} for j in view.jobs]
            + [{"type": "queued", **q.as_dict()} for q in view.queued]
            + [{"type": "worker", **w.as_dict()} for w in view.workers])


def last_errors(migrations: Iterable[MigrationView]) -> dict[str, str]:
    """address -> the failure reason or last error of its newest migration."""
    return {m.address: (m.failed_reason or m.last_error or "") for m in migrations}


def rows_of(plan: Plan, errors: dict[str, str], *, placement: str | None = None,
            system: str | None = None, state: str | None = None) -> list[StatusRow]:
    """PURE: the status rows of a plan, filtered (the web page shares this)."""
    return [row_of(change, errors, plan.at)
            for change in matching(plan, placement=placement, system=system, state=state)]


def row_of(change: Change, errors: dict[str, str], now: datetime) -> StatusRow:
    """PURE: the status row of one change."""
    return _row(change, errors.get(change.address, ""), now)


def matching(plan: Plan, *, placement: str | None = None, system: str | None = None,
             state: str | None = None) -> list[Change]:
    """PURE: the changes of a plan the status filters keep."""
    kept = []
    for change in plan.changes:
        if placement is not None and change.placement != placement:
            continue
        if system is not None and system not in (change.source, change.target):
            continue
        if state == "waiting":
            if change.action not in ("wait", "step") or change.due_at(plan.at):
                continue
        elif not _matches(change, state):
            continue
        kept.append(change)
    return kept


def route(row: StatusRow) -> str:
    """`s1 -> s2` for a move, `= s1` for a mailbox that stays where it is (in sync)."""
    return f"= {row.target}" if row.source == row.target else f"{row.source} -> {row.target}"


def table(rows: list[StatusRow], jobs: JobsView | None = None) -> list[str]:
    """The rows as an aligned text table; a mailbox whose step is on a worker says so
    after its next step (`E15 (running on HOST:PID)`)."""
    head = ("ADDRESS", "PLACEMENT", "SOURCE -> TARGET", "STATE", "NEXT", "WHEN", "LAST ERROR")
    on = jobs.by_address() if jobs is not None else {}
    return aligned([head] + [(r.address, r.placement, route(r), r.state,
                              next_text(r, on.get(r.address)), r.due, r.last_error[:80])
                             for r in rows])


def next_text(row: StatusRow, job: JobLine | None) -> str:
    """PURE: the NEXT cell of a row, with its job on a worker if it has one."""
    return row.next if job is None else f"{row.next} ({job.short})"


def aligned(cells: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows of cells as aligned columns (the last one as long as it is)."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]) - 1)]
    return [(indent + "  ".join(c[i].ljust(widths[i]) for i in range(len(widths)))
             + "  " + c[-1]).rstrip() for c in cells]


def jobs_table(view: JobsView) -> list[str]:
    """PURE: the workers' section of `reconcile status` (nothing when the view is empty:
    SQLite, or no worker ever started)."""
    if view.empty:
        return []
    lines = ["", f"Data jobs on workers: {view.summary}"]
    if view.jobs:
        lines += aligned([("ADDRESS", "STEP", "WORKER", "SINCE", "HEARTBEAT", "ATTEMPTS",
                           "STATE")] + [
            (j.address, j.what, j.worker or "-",
             f"{stamp(j.since) or '-'} ({age(j.seconds)})",
             "-" if j.heartbeat_age is None else f"{age(j.heartbeat_age)} ago",
             str(j.attempts), j.state if j.state == "running" else j.text)
            for j in view.jobs], indent="  ")
    for q in view.queued:
        steps = ", ".join(f"{step} {n}" for step, n in q.steps)
        lines.append(f"  queued {q.source} -> {q.target}: {q.count} ({steps}; the oldest "
                     f"waiting {age(q.oldest_age)})")
    if view.workers:
        lines += ["", "Workers:"]
        lines += aligned([("WORKER", "HOST", "PID", "JOBS", "SINCE", "LAST SEEN")] + [
            (w.name, w.host, str(w.pid), f"{w.running} of {w.concurrency}",
             stamp(w.started_at) or "-", w.text) for w in view.workers], indent="  ")
    return lines


def suspend(store: Store, placement: str, *, known: set[str], by: str, reason: str,
            commit: str | None, now: datetime) -> str:
    """Suspend a placement (one of `known`); what was done."""
    if placement not in known:
        raise MailferryError(f"no placement {placement!r} in the specs (known: "
                             f"{', '.join(sorted(known)) or 'none'})")
    with store.session() as session:
        if session.get(PlacementSuspension, placement) is not None:
            raise MailferryError(f"placement {placement} is already suspended")
        session.add(PlacementSuspension(placement=placement, since=now, by=by, reason=reason))
        count = _mark(session, placement, "suspend", by, reason, commit, now)
    return f"placement {placement} suspended ({count} migrations in progress paused)"


def resume(store: Store, placement: str, *, by: str, commit: str | None,
           now: datetime) -> str:
    """Resume a suspended placement; what was done."""
    with store.session() as session:
        row = session.get(PlacementSuspension, placement)
        if row is None:
            raise MailferryError(f"placement {placement} is not suspended")
        session.delete(row)
        count = _mark(session, placement, "resume", by, "", commit, now)
    return f"placement {placement} resumed ({count} migrations in progress)"


def _mark(session: Session, placement: str, step: str, by: str, reason: str,
          commit: str | None, now: datetime) -> int:
    """One event for the placement and one per migration in progress of it."""
    detail = {"placement": placement, "by": by, "reason": reason}
    record_event(session, None, step, address=f"placement:{placement}", detail=detail,
                 commit=commit, at=now)
    count = 0
    for m in session.scalars(select(Migration).where(Migration.placement == placement,
                                                     Migration.purged.is_(False))):
        if m.state in (MigrationState.DONE, MigrationState.SOURCE_DELETED) or m.failed:
            continue
        record_event(session, m, step, from_state=m.state, to_state=m.state, detail=detail,
                     commit=commit, at=now)
        count += 1
    return count


def retry(store: Store, address: str, *, by: str, commit: str | None, now: datetime) -> str:
    """Clear the failure (or back-off) of the newest migration of `address`; what was done."""
    key = address_key(address)  # either IDN form, any case: the key the store holds
    with store.session() as session:
        error = session.get(AddressError, key)
        if error is not None:  # a create or E1 that failed: no migration row to clear
            what = (f"failure at {error.step} cleared" if error.failed_reason is not None
                    else "back-off cleared")
            record_event(session, None, "retry", address=key, detail={
                "by": by, "failed_step": error.step, "reason": error.failed_reason,
                "last_error": error.last_error}, commit=commit, at=now)
            session.delete(error)
            return f"{address}: {what}; {error.step} runs again at the next apply"
        m = session.scalars(select(Migration).where(Migration.address == key)
                            .order_by(Migration.id.desc()).limit(1)).first()
        if m is None:
            raise MailferryError(f"no migration on record for {address}")
        if not m.failed and m.next_attempt_at is None:
            raise MailferryError(f"the migration of {address} (state {m.state}) has not "
                                 "failed: nothing to retry")
        detail = {"by": by, "failed_step": m.failed_step, "reason": m.failed_reason,
                  "last_error": m.last_error}
        what = (f"failure at {m.failed_step} cleared" if m.failed
                else "back-off cleared")
        m.failed_reason = None
        m.failed_step = None
        m.last_error = None
        m.next_attempt_at = None
        m.attempts = 0
        m.error_since = None
        m.station_action = None  # a station step asks its station again, afresh
        record_event(session, m, "retry", from_state=m.state, to_state=m.state,
                     detail=detail, commit=commit, at=now)
        return f"{address}: {what}; resumes at state {m.state}"
