"""The plan: (desired, observed, now) -> what each mailbox needs next, and when.

PURE (DESIGN rule 1): no I/O, no clock, no database. The engine gives it the validated specs,
a snapshot of the state store's migrations and fed's directory, and the instant to plan for;
it returns one `Change` per mailbox. `reconcile --plan` prints them, `reconcile --apply`
executes those due now. Keeping this pure is what makes `--at TIME` trustworthy (the same
function, another instant) and the plan over 100,000 mailboxes cheap.

The state machine is the patent's Figure 2 (DESIGN.md):

    0 -E2-> 1 -E20-> 2 -E21..E23-> 3 -E3/E4-> 4 -E5..E8-> 5 -E9-> 6
    6 -E11..E14-> 7 -E15/E17-> 8 -E30..E33-> 9 -E40-> 10 -E41/E42-> 13 -E43-> purged

with the modes of the migration deciding which arrows exist: without station checks
1 -E3/E4-> 4; without data transfer 6 goes straight to the station steps or E40; without
local station data 8 -E40-> 10; diary-only migrations never move the address:
1 -E13/E14/E16-> 7 -E17-> 8 -E40-> 10 and stop there; "delete never" stops at 10. The code
holds this as data: `TRANSITIONS` (state -> its arrows, each with its guard and when it is
due), which `next_step` looks up; `tests/test_plan_table.py` checks every state in every
mode combination against DESIGN.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import chain
from typing import Literal

from mailferry.mail.addresses import mailbox_id_for, split_physical
from reconciler.spec.model import DesiredMailbox, WindowSpec
from reconciler.spec.modes import Modes
from reconciler.spec.windows import is_open, next_open
from reconciler.state.states import ACTIVE_STATES, MigrationState

Action = Literal[
    "in-sync", "create", "migrate", "step", "wait", "failed", "conflict", "orphan", "suspended",
    "refused", "manual",
]
BLOCKED: frozenset[str] = frozenset({"failed", "conflict", "orphan", "refused"})  # need an admin

# Step names as the patent numbers them; the plan and the events use these labels.
STEP_TITLES: dict[str, str] = {
    "E1": "record the migration",
    "E2": "create the new mailbox (internal address, redirect to the old one)",
    "E20": "first station check",
    "E21": "schedule the second station check",
    "E22": "second station check and mailbox report",
    "E4": "give the new mailbox the old addresses (window open)",
    "E5": "up-sync, verify in fed and hold the addresses",
    "E9": "flip the directory, release held mail, redirect the old mailbox",
    "E11": "hand the mailbox to the data mover",
    "E15": "copy and verify old mail and diary data",
    "E16": "hand the diary data to the data mover (diary only)",
    "E17": "copy and verify diary data",
    "E30": "station uploads local mail and switches the client",
    "E40": "addresses and data done",
    "E41": "delete the old mailbox",
    "E43": "purge the finished record",
    "create": "create the mailbox on its system",
}



@dataclass(frozen=True, slots=True)
class MigrationView:
    """What the plan needs of a migration row (a snapshot, detached from the database)."""

    id: int
    address: str
    source_system: str
    target_system: str
    state: int
    state_since: datetime
    modes: Modes
    placement: str
    failed_reason: str | None = None
    failed_step: str | None = None
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    station: str | None = None
    station_action: str | None = None
    suspended: bool = False
    purged: bool = False
    source_mailbox: str = ""
    mailbox_size: int | None = None  # bytes, as the station reported it (E23)
    manual_step: str | None = None  # what a person must do before the next step can run


@dataclass(frozen=True)
class AddressErrorView:
    """The errors of a `create` or `E1` not yet done (no migration row to keep them in)."""

    step: str
    last_error: str
    next_attempt_at: datetime | None = None
    failed_reason: str | None = None
    manual_step: str | None = None  # what a person must do first (a hosted mailbox)


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the plan: a mailbox, where it stands and what comes next."""

    address: str
    action: Action
    source: str | None
    target: str | None
    state: int | None = None
    step: str | None = None  # next patent step, e.g. "E9"
    due: datetime | None = None  # None with action "wait": waiting for an event, not a time
    destructive: bool = False
    reason: str = ""
    migration_id: int | None = None
    poll: bool = False  # waiting on a station: the engine looks for its report every pass
    refused: str = ""  # a spec change refused because the migration is past its hold
    placement: str | None = None  # the placement the mailbox belongs to (specs, else record)

    def due_at(self, now: datetime) -> bool:
        """True when the engine should run this change at `now`."""
        if self.action not in ("create", "migrate", "step"):
            return False
        return self.due is None or self.due <= now

    @property
    def title(self) -> str:
        return STEP_TITLES.get(self.step or "", "")


@dataclass(frozen=True)
class Unmanaged:
    """A mailbox a system holds (fed's directory knows it) that no spec and no migration
    names: shown by the plan, never touched (an adopted system's mailboxes not imported)."""

    physical: str
    system: str
    addresses: tuple[str, ...]


@dataclass
class Plan:
    """Every mailbox's change, plus the figures of the summary line."""

    at: datetime
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a window the data will not fit
    unmanaged: list[Unmanaged] = field(default_factory=list)

    def due(self) -> list[Change]:
        """What the engine runs now: due steps, and station waits to poll."""
        return [c for c in self.changes
                if c.due_at(self.at) or (c.poll and (c.due is None or c.due <= self.at))]

    def counts(self) -> Counter[str]:
        counter: Counter[str] = Counter()
        for change in self.changes:
            if change.action == "in-sync":
                counter["in sync"] += 1
            elif change.action in ("failed", "conflict", "refused"):
                counter["failed"] += 1
            elif change.action == "manual":
                counter["waiting"] += 1
                counter["manual"] += 1
            elif change.due_at(self.at):
                counter["due now"] += 1
            else:
                counter["waiting"] += 1
            if change.destructive:
                counter["destructive"] += 1
        return counter

    def next_due(self) -> datetime | None:
        """The earliest future instant at which something becomes due (watch sleeps until)."""
        future = [c.due for c in self.changes
                  if c.due is not None and c.due > self.at
                  and (c.action in ("create", "migrate", "step") or c.poll)]
        return min(future, default=None)

    @property
    def pending(self) -> bool:
        """True when the world differs from the specs (Terraform's exit code 2)."""
        return any(c.action != "in-sync" for c in self.changes)

    def summary(self, counts: Counter[str] | None = None) -> str:
        """The frozen summary line (tools may parse it; do not change its shape); `counts`
        when the caller has them already (a walk over every change)."""
        c = self.counts() if counts is None else counts
        # The unmanaged count is a sentence of its own, only when there are some: the
        # first sentence keeps its frozen shape.
        extra = f" {len(self.unmanaged)} unmanaged." if self.unmanaged else ""
        if c["manual"]:  # counted among the waiting; a sentence of its own, like unmanaged
            extra += (f" {c['manual']} manual step{'s' if c['manual'] != 1 else ''} "
                      "(a person must act).")
        return (
            f"Plan: {len(self.changes)} mailboxes, {c['due now']} due now, "
            f"{c['waiting']} waiting, {c['failed']} failed, {c['in sync']} in sync, "
            f"{c['destructive']} destructive.{extra}"
        )


class WindowClock:
    """Window answers cached per (window, instant): a plan asks the same few windows often."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._open: dict[str, bool] = {}
        self._next: dict[str, datetime | None] = {}

    def is_open(self, window: WindowSpec | None) -> bool:
        if window is None:
            return True
        if window.name not in self._open:
            self._open[window.name] = is_open(window, self.now)
        return self._open[window.name]

    def next_open(self, window: WindowSpec | None) -> datetime | None:
        if window is None:
            return self.now
        if window.name not in self._next:
            self._next[window.name] = next_open(window, self.now)
        return self._next[window.name]


# -- the state machine as a table ------------------------------------------------------------
# TRANSITIONS[state] lists the arrows leaving that state of the patent's Figure 2 (DESIGN.md,
# "The state machine"), in order: the first whose guard holds is the next step; a state with
# no arrow that holds is where the migration rests (in sync). An arrow says *when* its step
# is due:
#
#   "now"       at once (the steps after the window opened run back to back: short holds)
#   "window"    when the placement's window is open and the policy's maxParallel allows
#   "prestage"  the policy's prestageLead before the window opens (E2 pre-creates BOX2)
#   "recheck"   the policy's recheckLead before the window opens (E21 asks the second check)
#   "station"   when the station agent reports (no time: the engine polls its reports)
#   "delete"    deleteSource.after past state 10, with deleteSource.consent (invariant 6)
#
# (`_DUE` maps each to its function), and a step that failed temporarily is due no earlier
# than its back-off (`_step`).
Guard = Callable[["MigrationView"], bool]
When = Literal["now", "window", "prestage", "recheck", "station", "delete"]


def _always(m: MigrationView) -> bool:
    return True


def _diary_only(m: MigrationView) -> bool:
    return m.modes.diary_only


def _station_checks(m: MigrationView) -> bool:
    return m.modes.station_checks


def _second_check_asked(m: MigrationView) -> bool:
    return m.station_action == "check2"


def _copies_mail(m: MigrationView) -> bool:
    return m.modes.copies_mail


def _local_station_data(m: MigrationView) -> bool:
    return m.modes.local_station_data


def _local_data_after_copy(m: MigrationView) -> bool:
    return m.modes.local_station_data and not m.modes.diary_only  # diary only: 8 -E40-> 10


def _deletes_source(m: MigrationView) -> bool:
    return not m.modes.ends_at_10


@dataclass(frozen=True, slots=True)
class Arrow:
    """One arrow of Figure 2: the step taken when `guard` holds, due by `when`."""

    step: str
    when: When
    guard: Guard = _always
    waiting_for: str = ""  # STATION arrows: what the migration waits for


S = MigrationState
TRANSITIONS: dict[int, tuple[Arrow, ...]] = {
    S.RECORDED: (Arrow("E2", "prestage"),),
    S.PRESTAGED: (
        Arrow("E16", "now", _diary_only),  # diary only: 1 -E13/E14/E16-> 7
        Arrow("E20", "station", _station_checks, "the first station check"),
        Arrow("E4", "window"),  # without station checks: 1 -E3/E4-> 4
    ),
    S.FIRST_CHECK: (
        Arrow("E22", "station", _second_check_asked, "the second station check"),
        Arrow("E21", "recheck"),
    ),
    S.SECOND_CHECK: (Arrow("E4", "window"),),
    S.ADDRESSES_FORMED: (Arrow("E5", "now"),),
    S.HELD: (Arrow("E9", "now"),),
    S.FLIPPED: (
        Arrow("E11", "now", _copies_mail),
        Arrow("E30", "station", _local_station_data, "the station's local data"),
        Arrow("E40", "now"),  # no data to move: 6 -E40-> 10
    ),
    S.MOVER_TOOK: (Arrow("E17", "now", _diary_only), Arrow("E15", "now")),
    S.DATA_COPIED: (
        Arrow("E30", "station", _local_data_after_copy, "the station's local data"),
        Arrow("E40", "now"),  # without local station data: 8 -E40-> 10
    ),
    S.STATION_DONE: (Arrow("E40", "now"),),
    S.DONE: (Arrow("E41", "delete", _deletes_source),),  # delete never, diary only: rest at 10
    S.SOURCE_DELETED: (),  # E43 purges the record later: housekeeping (`purge_due`)
}
del S


def next_step(
    m: MigrationView, desired: DesiredMailbox | None, clock: WindowClock, active_count: int,
) -> Change:
    """The next step of one migration, by the state machine and its recorded modes."""
    for arrow in TRANSITIONS.get(m.state, ()):
        if arrow.guard(m):
            return _DUE[arrow.when](m, arrow, desired, clock, active_count)
    return _in_sync(m)


def _step(m: MigrationView, name: str, due: datetime | None = None, *,
          destructive: bool = False, wait: bool = False, reason: str = "",
          poll: bool = False) -> Change:
    """The change taking step `name`, due no earlier than the back-off of its last error."""
    if m.next_attempt_at is not None and (due is None or m.next_attempt_at > due):
        due = m.next_attempt_at
        # A wait the specs ask for (a daily budget spent) is no error: its own words.
        waiting = (m.last_error or "").startswith("waiting: ")
        reason = reason or (m.last_error or "" if waiting else f"retry after error: {m.last_error}")
    return Change(
        address=m.address, action="wait" if wait else "step", source=m.source_system,
        target=m.target_system, state=m.state, step=name, due=due,
        destructive=destructive, reason=reason, migration_id=m.id, poll=poll,
        placement=m.placement,
    )


Due = Callable[["MigrationView", Arrow, "DesiredMailbox | None", WindowClock, int], Change]


def _due_now(m: MigrationView, arrow: Arrow, desired: DesiredMailbox | None,
             clock: WindowClock, active_count: int) -> Change:
    return _step(m, arrow.step, clock.now)


def _due_in_window(m: MigrationView, arrow: Arrow, desired: DesiredMailbox | None,
                   clock: WindowClock, active_count: int) -> Change:
    window = desired.window if desired is not None else None
    opening = clock.next_open(window)
    if opening is None:
        return _step(m, arrow.step, wait=True, reason="the window never opens")
    if opening > clock.now:
        return _step(m, arrow.step, opening,
                     reason=f"window {window.name if window else ''} closed")
    if active_count >= m.modes.max_parallel:
        return _step(m, arrow.step, wait=True, reason="max parallel migrations reached")
    return _step(m, arrow.step, clock.now)


def _due_before_window(lead: Callable[[Modes], timedelta]) -> Due:
    """Due `lead` before the window opens (at once when it is open or the lead is past)."""
    def due(m: MigrationView, arrow: Arrow, desired: DesiredMailbox | None,
            clock: WindowClock, active_count: int) -> Change:
        opening = clock.next_open(desired.window if desired is not None else None)
        if opening is None:
            return _step(m, arrow.step, wait=True, reason="the window never opens")
        return _step(m, arrow.step, max(clock.now, opening - lead(m.modes)))
    return due


def _due_on_report(m: MigrationView, arrow: Arrow, desired: DesiredMailbox | None,
                   clock: WindowClock, active_count: int) -> Change:
    return _step(m, arrow.step, wait=True, poll=True, reason=f"waiting for {arrow.waiting_for}")


def _due_for_deletion(m: MigrationView, arrow: Arrow, desired: DesiredMailbox | None,
                      clock: WindowClock, active_count: int) -> Change:
    """E41: destructive, so only for an address still in the specs, with the consent."""
    if desired is None:
        return _in_sync(m, "the address left the specs: the old mailbox is kept")
    if not desired.policy.delete_consent:
        return Change(
            address=m.address, action="refused", source=m.source_system,
            target=m.target_system, state=m.state, step=arrow.step, destructive=True,
            migration_id=m.id, placement=m.placement,
            reason=(f"deleting the old mailbox needs consent: set deleteSource.consent: "
                    f"true in policy {desired.policy.name}, or deleteSource: never"))
    delay = m.modes.delete_source_after or timedelta(0)  # not None: the guard checked
    return _step(m, arrow.step, m.state_since + delay, destructive=True)


_DUE: dict[When, Due] = {
    "now": _due_now,
    "window": _due_in_window,
    "prestage": _due_before_window(lambda modes: modes.prestage_lead),
    "recheck": _due_before_window(lambda modes: modes.recheck_lead),
    "station": _due_on_report,
    "delete": _due_for_deletion,
}


def _in_sync(m: MigrationView, reason: str = "") -> Change:
    return Change(
        address=m.address, action="in-sync", source=m.source_system, target=m.target_system,
        state=m.state, reason=reason, migration_id=m.id, placement=m.placement,
    )


def purge_due(m: MigrationView, now: datetime) -> bool:
    """E43: a finished record older than the retention period is purged (housekeeping)."""
    return (m.state == MigrationState.SOURCE_DELETED
            and m.state_since + m.modes.retention <= now)


def make_plan(
    desired: dict[str, DesiredMailbox],
    migrations: list[MigrationView],
    directory: dict[str, str],
    now: datetime,
    suspended: frozenset[str] = frozenset(),
    address_errors: dict[str, AddressErrorView] | None = None,
) -> Plan:
    """The plan for every desired address and every migration still on record.

    `migrations` may include purged records (the newest per address counts): a purged
    finished migration still tells that moving the address again is a move back.
    `suspended` names the placements an admin suspended; `address_errors` the back-off or
    failure of a `create` or `E1` that failed."""
    clock = WindowClock(now)
    plan = Plan(at=now)
    by_address: dict[str, MigrationView] = {}
    for view in migrations:  # newest wins: callers pass them ordered by id
        by_address[view.address] = view
    active: Counter[str] = Counter(
        m.modes.policy for m in by_address.values()
        if m.state in ACTIVE_STATES and m.failed_reason is None
    )

    recorded = {a for a, m in by_address.items() if not m.purged}
    for address in sorted(set(desired) | recorded):
        want = desired.get(address)
        current = by_address.get(address)
        change = _change_for(address, want, current, directory, clock, active)
        if address_errors and address in address_errors and change.action in ("create",
                                                                               "migrate"):
            change = _with_error(change, address_errors[address])
        if change.action != "in-sync" and (
                (current is not None and (current.suspended or current.placement in suspended))
                or (want is not None and want.placement in suspended)):
            change = Change(address=address, action="suspended", source=change.source,
                            target=change.target, state=change.state, step=change.step,
                            migration_id=change.migration_id, placement=change.placement,
                            reason="suspended by an admin (reconcile resume PLACEMENT)")
        if change.step == "E4" and change.due_at(now) and current is not None:
            active[current.modes.policy] += 1  # later mailboxes see this one's slot
        plan.changes.append(change)
    plan.unmanaged = unmanaged(desired, recorded, directory)
    return plan


def unmanaged(desired: dict[str, DesiredMailbox], recorded: set[str],
              directory: dict[str, str]) -> list[Unmanaged]:
    """The mailboxes of fed's directory none of whose addresses a spec or migration names."""
    known = set(desired) | recorded
    known.update(chain.from_iterable([w.aliases for w in desired.values() if w.aliases]))
    # Set operations, not a walk of 100,000 entries: usually fed knows no other address.
    strangers = directory.keys() - known
    if not strangers:
        return []
    managed = {directory[a] for a in known & directory.keys()}
    groups: dict[str, list[str]] = {}
    for address in strangers:  # any order: every group and the groups are sorted below
        physical = directory[address]
        if physical not in managed:
            groups.setdefault(physical, []).append(address)
    found = []
    for physical, addresses in groups.items():
        where = split_physical(physical)
        if where is not None:  # the access address (the mailbox id's) first, then aliases
            first = sorted(addresses, key=lambda a: (mailbox_id_for(a) != where[1], a))
            found.append(Unmanaged(physical, where[0], tuple(first)))
    return sorted(found, key=lambda b: (b.system, b.addresses[0]))


def _with_error(change: Change, error: AddressErrorView) -> Change:
    """A create or E1 after its errors: frozen (`!`) once permanent, waiting for a manual
    step (`>`), else due after its back-off."""
    if error.failed_reason is not None:
        return replace(change, action="failed", step=error.step, reason=error.failed_reason,
                       due=None)
    if error.manual_step is not None:  # a person's step, rechecked at next_attempt_at
        return replace(change, action="manual", step=error.step, reason=error.manual_step,
                       due=error.next_attempt_at, poll=True)
    if error.next_attempt_at is not None and (change.due is None
                                              or error.next_attempt_at > change.due):
        return replace(change, due=error.next_attempt_at,
                       reason=f"retry after error: {error.last_error}")
    return change


def _change_for(
    address: str, want: DesiredMailbox | None, m: MigrationView | None,
    directory: dict[str, str], clock: WindowClock, active: Counter[str],
) -> Change:
    where = split_physical(directory.get(address, "") or "")
    actual_system = where[0] if where else None
    change = _decide(address, want, m, actual_system, clock, active)
    if change.placement is None and want is not None:  # (most changes name it already:
        change = replace(change, placement=want.placement)  # replace() is costly)
    return change


def _decide(
    address: str, want: DesiredMailbox | None, m: MigrationView | None,
    actual_system: str | None, clock: WindowClock, active: Counter[str],
) -> Change:
    """The change for one address (see `_change_for`)."""
    if m is not None and not (m.state == MigrationState.SOURCE_DELETED
                              or (m.state == MigrationState.DONE and m.modes.ends_at_10)):
        # A migration is in progress: it decides, whatever the directory says.
        return _blocked(address, want, m) or _manual(m) or _in_progress(want, m, clock, active)
    if want is None:
        # Not desired any more, nothing in progress: mailferry never deletes on removal.
        if m is not None:
            return next_step(m, None, clock, 0) if m.state == MigrationState.DONE else _in_sync(m)
        return Change(address=address, action="in-sync", source=actual_system, target=None)
    if m is not None:
        after = _after_migration(address, want, m, actual_system, clock, active)
        if after is not None:
            return after
    if actual_system is None:
        return Change(address=address, action="create", source=None, target=want.system,
                      step="create", due=clock.now, placement=want.placement)
    if actual_system == want.system:
        return Change(address=address, action="in-sync", source=actual_system,
                      target=want.system, placement=want.placement)
    return Change(address=address, action="migrate", source=actual_system, target=want.system,
                  state=None, step="E1", due=clock.now, placement=want.placement)


def _blocked(address: str, want: DesiredMailbox | None, m: MigrationView) -> Change | None:
    """A migration in progress that waits for an admin: failed, suspended, or the specs
    changed under it before the hold (a conflict, an orphan); None when it may go on."""
    if m.failed_reason is not None:
        return Change(
            address=address, action="failed", source=m.source_system,
            target=m.target_system, state=m.state, step=m.failed_step,
            reason=m.failed_reason, migration_id=m.id, placement=m.placement,
        )
    if m.suspended:
        return Change(address=address, action="suspended", source=m.source_system,
                      target=m.target_system, state=m.state, migration_id=m.id,
                      reason="suspended by an admin", placement=m.placement)
    if m.state >= MigrationState.HELD:
        return None
    if want is None:
        return Change(
            address=address, action="orphan", source=m.source_system,
            target=m.target_system, state=m.state, migration_id=m.id,
            reason="the address left the specs: the migration is paused before the hold",
        )
    if want.system != m.target_system:
        return Change(
            address=address, action="conflict", source=m.source_system,
            target=want.system, state=m.state, migration_id=m.id,
            reason=(f"the specs now want {want.system}, but a migration to "
                    f"{m.target_system} is in progress (state {m.state})"),
        )
    return None


def _manual(m: MigrationView) -> Change | None:
    """A migration waiting for a person (a mailbox only its provider can create): a state
    of its own, shown with what to do; the engine rechecks the step at `next_attempt_at`
    (a poll), and every step after it waits."""
    if m.manual_step is None:
        return None
    arrows = [a for a in TRANSITIONS.get(m.state, ()) if a.guard(m)]
    return Change(address=m.address, action="manual", source=m.source_system,
                  target=m.target_system, state=m.state,
                  step=arrows[0].step if arrows else None, due=m.next_attempt_at,
                  reason=m.manual_step, migration_id=m.id, poll=True, placement=m.placement)


def _in_progress(want: DesiredMailbox | None, m: MigrationView, clock: WindowClock,
                 active: Counter[str]) -> Change:
    """The next step of a migration in progress that is not blocked."""
    change = next_step(m, want, clock, active[m.modes.policy])
    if want is not None and want.system != m.target_system:
        # Past the hold (state >= 5) the addresses already belong to the target: going
        # back half-way would lose the guarantees. Finish as recorded, refuse the edit.
        change = replace(change, refused=(
            f"the specs now want {want.system}: refused, the hold began (state "
            f"{m.state}); the migration to {m.target_system} continues as recorded"))
    return change


def _after_migration(
    address: str, want: DesiredMailbox, m: MigrationView, actual_system: str | None,
    clock: WindowClock, active: Counter[str],
) -> Change | None:
    """A desired address whose last migration finished (13, or 10 by its modes): in sync
    where it went, a move back where the specs now place it elsewhere; None otherwise."""
    if m.target_system == want.system:
        if m.state == MigrationState.SOURCE_DELETED or m.modes.diary_only:
            return _in_sync(m)
        return next_step(m, want, clock, active[m.modes.policy])
    if actual_system is None or actual_system == want.system or m.modes.diary_only:
        return None
    # A move back: the specs now place the address elsewhere. A new migration,
    # destructive, needing consent.
    if not want.allow_move_back:
        return Change(
            address=address, action="refused", source=actual_system, target=want.system,
            step="E1", destructive=True, migration_id=m.id,
            reason=(f"moving back a mailbox whose migration to {m.target_system} finished "
                    f"(state {m.state}) needs consent: set allowMoveBack: true in "
                    f"placement {want.placement}"))
    return Change(address=address, action="migrate", source=actual_system,
                  target=want.system, step="E1", due=clock.now, destructive=True,
                  reason=f"move back: the migration to {m.target_system} had finished",
                  placement=want.placement)
