"""E20-E24 and E30-E33: what the reconciler asks of the user's station and what it reads back.

The engine never talks to a workstation: it sets `Migration.station_action` (the station API
serves it to the agent, which polls) and reads `station_reports`. These steps run each pass
while a migration waits on its station; they raise `NotReady` until the report arrives.
"""

from __future__ import annotations

from sqlalchemy import select

from reconciler.errors import NotReady, PermanentError
from reconciler.state.model import Migration, StationReport
from reconciler.state.states import MigrationState
from reconciler.state.store import record_event
from reconciler.steps.base import Outcome, StepContext


def _ask(ctx: StepContext, m: Migration, action: str, step: str) -> None:
    """Authorise the station to run `action` (recorded once as an event without transition)."""
    if m.station is None:
        raise PermanentError("the policy needs the user's station but the placement names none",
                             address=m.address, step=step)
    if m.station_action != action:
        m.station_action = action
        m.station_action_since = ctx.now
        record_event(ctx.session, m, step, detail={"station": m.station, "action": action},
                     commit=ctx.specs.commit, at=ctx.now)


def _latest(ctx: StepContext, m: Migration, kinds: tuple[str, ...]) -> StationReport | None:
    since = m.station_action_since
    query = (select(StationReport)
             .where(StationReport.migration_id == m.id, StationReport.kind.in_(kinds))
             .order_by(StationReport.id.desc()).limit(1))
    report = ctx.session.scalars(query).first()
    if report is None or (since is not None and report.at < since):
        return None
    return report


def e20_first_check(ctx: StepContext, m: Migration) -> Outcome:
    """E20: the first station check passed (1 -> 2)."""
    _ask(ctx, m, "check1", "E20")
    report = _latest(ctx, m, ("check1",))
    if report is None:
        raise NotReady("waiting for the first station check", address=m.address, step="E20")
    if not report.ok:
        problems = report.detail.get("problems") or ["negative"]
        raise NotReady(f"first station check negative: {problems}", address=m.address,
                       step="E20", delay=60)
    m.station_action = None
    return Outcome(MigrationState.FIRST_CHECK, "E20",
                   {"station": m.station, "report": report.detail})


def e21_schedule_recheck(ctx: StepContext, m: Migration) -> Outcome:
    """E21: the instant planned for the second check has come: ask the station for it."""
    _ask(ctx, m, "check2", "E21")
    raise NotReady("second station check requested", address=m.address, step="E22")


def e22_second_check(ctx: StepContext, m: Migration) -> Outcome:
    """E22/E23 (2 -> 3) with the mailbox type and size, or E24: a negative check ends it."""
    _ask(ctx, m, "check2", "E21")
    report = _latest(ctx, m, ("check2",))
    if report is None:
        raise NotReady("waiting for the second station check", address=m.address, step="E22")
    if not report.ok:
        problems = report.detail.get("problems") or ["negative"]
        raise PermanentError(f"second station check negative (E24): {problems}",
                             address=m.address, step="E24")
    m.mailbox_type = str(report.detail.get("mailbox_type") or "") or None
    size = report.detail.get("mailbox_size")
    m.mailbox_size = int(size) if isinstance(size, int | float) else None
    m.station_action = None
    return Outcome(MigrationState.SECOND_CHECK, "E22-E23", {"mailbox_type": m.mailbox_type,
                                  "mailbox_size": m.mailbox_size})


def e30_local_data(ctx: StepContext, m: Migration) -> Outcome:
    """E30-E33: the station uploaded local mail, switched, tested and cleaned its profile."""
    _ask(ctx, m, "local-migrate", "E30")
    report = _latest(ctx, m, ("done", "failed"))
    if report is None:
        raise NotReady("waiting for the station's local data and profile switch",
                       address=m.address, step="E30")
    if report.kind == "failed" or not report.ok:
        raise PermanentError(f"station gave up after its retries (E32): {report.detail}",
                             address=m.address, step="E32")
    m.station_action = None
    return Outcome(MigrationState.STATION_DONE, "E30-E33",
                   {"station": m.station, "report": report.detail})
