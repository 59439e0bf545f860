"""PURE: what the status page shows, computed from one snapshot of the world.

Nothing here reads a database, calls fed or knows of HTTP: `snapshot.py` gathers the facts
(`Snapshot`), these functions turn them into plain view objects the templates render, and
the tests and the benchmark can call them directly. The mailbox table reuses the status
command's rows (`reconciler.status.rows_of`), so the page and `reconcile status` never
disagree; the window fit is the plan's own `window_fit`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from reconciler.fit import WindowLoad, window_fit
from reconciler.humanize import human_bytes, human_duration
from reconciler.jobs.view import JobLine, JobsView
from reconciler.mover.manifest import seconds_for
from reconciler.plan import BLOCKED, Change, MigrationView, Plan
from reconciler.spec.model import WindowSpec
from reconciler.spec.windows import next_open, open_until
from reconciler.state.states import MigrationState
from reconciler.status import StatusRow, matching, next_text, row_of

# The patent's states (DESIGN.md, "The state machine"): number, steps, what has happened.
STATES: tuple[tuple[int, str, str], ...] = (
    (0, "E1", "migration recorded"),
    (1, "E2", "BOX2 created on the target"),
    (2, "E20", "first station check passed"),
    (3, "E21-E23", "second check passed; size reported"),
    (4, "E3-E4", "AD1 formed on BOX2"),
    (5, "E5-E8", "address list verified; hold active"),
    (6, "E9", "directory flipped; hold released"),
    (7, "E13-E14", "data mover took the mailbox"),
    (8, "E15-E17", "old mail copied and verified"),
    (9, "E30-E33", "station switched the client"),
    (10, "E40", "addresses and data done"),
    (13, "E41-E42", "old mailbox deleted"),
)

# The segments of a wave's bar, in the order a mailbox goes through them.
SEGMENTS: tuple[tuple[str, str], ...] = (
    ("waiting", "not started"), ("prestaged", "prestaged 1-3"), ("cutover", "cutover 4-6"),
    ("copying", "copying 7"), ("copied", "copied 8-9"), ("done", "done 10-13"),
    ("failed", "failed"),
)
PAGE_ROWS = 100  # mailbox table rows per page: a page stays fast at 100,000 mailboxes


@dataclass(frozen=True)
class CopyFacts:
    """How far the copy of one migration's old mail is (newest pass, or the running one)."""

    messages_total: int | None = None
    bytes_total: int | None = None
    messages_done: int = 0
    bytes_done: int = 0
    verified: bool = False
    running: bool = False


@dataclass(frozen=True)
class PlacementInfo:
    """A placement of the specs: where its mailboxes go and in which window."""

    name: str
    system: str
    window: WindowSpec | None
    mailboxes: int
    description: str = ""


@dataclass
class FedPanel:
    """fed's side of the cutover, or why it could not be read."""

    error: str | None = None
    holds: list[dict[str, Any]] = field(default_factory=list)  # address, since, age_s, waiting
    queue: dict[str, int] = field(default_factory=dict)  # pending, held, retrying, shunted
    destinations: list[tuple[str, int]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    nodes_error: str | None = None


@dataclass
class Snapshot:
    """Everything the overview is made from, read at one instant."""

    at: datetime
    plan: Plan
    migrations: dict[str, MigrationView]  # the newest migration of each address
    copies: dict[int, CopyFacts]  # migration id -> copy figures
    rates: tuple[float, float] | None  # measured (bytes/s, messages/s), None: no run yet
    placements: dict[str, PlacementInfo]
    fed: FedPanel
    suspended: frozenset[str] = frozenset()
    commit: str | None = None
    notes: list[str] = field(default_factory=list)  # what the page could not read
    jobs: JobsView = field(default_factory=JobsView)  # the workers' (empty: none)


@dataclass
class Bar:
    """One coloured segment of a progress bar."""

    kind: str
    label: str
    count: int
    percent: float


@dataclass
class WaveView:
    name: str
    description: str
    system: str
    window: str
    suspended: bool
    total: int
    bars: list[Bar]
    done: int
    failed: int
    messages_done: int
    messages_total: int
    bytes_done: int
    bytes_total: int
    copy_percent: float
    eta: str
    window_state: str
    fit: str
    fits: bool | None  # None: nothing to judge (no rate yet, no window, nothing left)

    @property
    def bytes_text(self) -> str:
        return f"{human_bytes(self.bytes_done)} of {human_bytes(self.bytes_total)}"


@dataclass
class MailboxRow:
    status: StatusRow
    copy: str  # "" when nothing to copy, else "37%" or "verified"
    failed: bool
    next: str  # the next step, with its job on a worker if it has one


@dataclass
class Failure:
    address: str
    placement: str
    state: str
    step: str
    action: str
    reason: str
    command: str


@dataclass
class TableView:
    """One page of the mailbox table; `matching` counts the whole filtered set."""

    rows: list[MailboxRow]
    matching: int
    page: int
    pages: int

    @property
    def first(self) -> int:
        """The number of the page's first row (1-based; 0 on an empty table)."""
        return (self.page - 1) * PAGE_ROWS + 1 if self.rows else 0

    @property
    def last(self) -> int:
        """The number of the page's last row (0 on an empty table)."""
        return (self.page - 1) * PAGE_ROWS + len(self.rows)

    @property
    def previous(self) -> int | None:
        return self.page - 1 if self.page > 1 else None

    @property
    def next(self) -> int | None:
        return self.page + 1 if self.page < self.pages else None


def segment(change: Change) -> str:
    """The bar segment of one mailbox."""
    if change.action == "failed":
        return "failed"
    state = change.state
    if state is None or (state == MigrationState.RECORDED and change.action == "migrate"):
        return "done" if change.action == "in-sync" else "waiting"
    if state >= MigrationState.DONE:
        return "done"
    if state >= MigrationState.DATA_COPIED:
        return "copied"
    if state == MigrationState.MOVER_TOOK:
        return "copying"
    if state >= MigrationState.ADDRESSES_FORMED:
        return "cutover"
    return "prestaged" if state >= MigrationState.PRESTAGED else "waiting"


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def window_state(window: WindowSpec | None, now: datetime) -> str:
    """'open until ...', 'opens ...' or 'no window'."""
    if window is None:
        return "no window: any time"
    opens = next_open(window, now)
    if opens is None:
        return f"{window.name}: never opens again"
    closes = open_until(window, opens)
    until = f" until {closes:%Y-%m-%d %H:%M}Z" if closes else ""
    if opens <= now:
        return f"{window.name}: open{until}"
    return f"{window.name}: opens {opens:%Y-%m-%d %H:%M}Z{until}"


def waves(snap: Snapshot) -> list[WaveView]:
    """One view per placement (of the specs, then of the records), in name order."""
    changes: dict[str, list[Change]] = {}
    for change in snap.plan.changes:
        changes.setdefault(change.placement or "-", []).append(change)
    names = sorted(set(snap.placements) | set(changes))
    return [_wave(snap, name, changes.get(name, [])) for name in names]


def _wave(snap: Snapshot, name: str, changes: list[Change]) -> WaveView:
    info = snap.placements.get(name)
    counts = Counter(segment(c) for c in changes)
    total = len(changes)
    bars = [Bar(kind, label, counts[kind], _percent(counts[kind], total))
            for kind, label in SEGMENTS if counts[kind]]
    msgs_done = msgs_total = bytes_done = bytes_total = left = 0
    for change in changes:
        m = snap.migrations.get(change.address)
        if m is None or m.placement != name:
            continue
        facts = snap.copies.get(m.id)
        size = (facts.bytes_total if facts and facts.bytes_total is not None
                else m.mailbox_size or 0)
        count = facts.messages_total if facts and facts.messages_total is not None else 0
        done_b = bytes_total_done(facts, size, m.state)
        copied = m.state >= MigrationState.DATA_COPIED or (facts and facts.verified)
        done_m = count if copied else (facts.messages_done if facts else 0)
        msgs_total += count
        bytes_total += size
        msgs_done += min(done_m, count) if count else done_m
        bytes_done += min(done_b, size) if size else done_b
        if m.state < MigrationState.DATA_COPIED and not m.failed_reason:
            left += 1
    remaining_b = max(bytes_total - bytes_done, 0)
    remaining_m = max(msgs_total - msgs_done, 0)
    window = info.window if info else None
    eta, fit, fits = _eta_fit(snap, window, left, remaining_m, remaining_b)
    return WaveView(
        name=name, description=info.description if info else "",
        system=info.system if info else "-",
        window=window.name if window else "-", suspended=name in snap.suspended,
        total=total, bars=bars, done=counts["done"], failed=counts["failed"],
        messages_done=msgs_done, messages_total=msgs_total, bytes_done=bytes_done,
        bytes_total=bytes_total, copy_percent=_percent(bytes_done, bytes_total)
        if bytes_total else _percent(msgs_done, msgs_total),
        eta=eta, window_state=window_state(window, snap.at), fit=fit, fits=fits)


def bytes_total_done(facts: CopyFacts | None, size: int, state: int) -> int:
    """Bytes of a migration's old mail known to be in the target."""
    if state >= MigrationState.DATA_COPIED or (facts is not None and facts.verified):
        return size
    return facts.bytes_done if facts is not None else 0


def _eta_fit(snap: Snapshot, window: WindowSpec | None, left: int, messages: int,
             size: int) -> tuple[str, str, bool | None]:
    if left == 0 or (messages == 0 and size == 0):
        return "-", "nothing left to copy", None
    if snap.rates is None:
        return "unknown", "no copy measured yet: no estimate", None
    seconds = seconds_for(snap.rates, messages, size)
    eta = human_duration(seconds)
    if window is None:
        return eta, "no window to fit", None
    load = WindowLoad(mailboxes=left, measured_bytes=size, measured=left,
                      measured_messages=messages, counted=left)
    warning = window_fit(window, snap.at, load, snap.rates)
    if warning:
        return eta, warning, False
    return eta, f"fits in {window.name} at the measured rate", True


def copy_text(m: MigrationView | None, facts: CopyFacts | None) -> str:
    """The copy column of a mailbox row."""
    if m is None or facts is None:
        return ""
    if facts.verified or m.state >= MigrationState.DATA_COPIED:
        return "verified"
    size = facts.bytes_total if facts.bytes_total is not None else m.mailbox_size or 0
    if size:
        return f"{_percent(facts.bytes_done, size):.0f}%" + (" copying" if facts.running else "")
    total = facts.messages_total or 0
    return f"{facts.messages_done}/{total}" + (" copying" if facts.running else "")


def table(snap: Snapshot, *, placement: str | None = None, system: str | None = None,
          state: str | None = None, page: int = 1) -> TableView:
    """The mailbox table, filtered like `reconcile status`, one page of it: the filters
    apply to every mailbox, the page is cut from what they keep, and only its rows are
    built (a page costs the same at 100 mailboxes as at 100,000)."""
    kept = matching(snap.plan, placement=placement, system=system, state=state)
    pages = max(1, -(-len(kept) // PAGE_ROWS))
    page = min(max(page, 1), pages)
    out = []
    on = snap.jobs.by_address()
    for change in kept[(page - 1) * PAGE_ROWS: page * PAGE_ROWS]:  # rows only for the page
        m = snap.migrations.get(change.address)
        row = row_of(change, last_error(m), snap.plan.at)
        facts = snap.copies.get(m.id) if m is not None else None
        out.append(MailboxRow(row, copy_text(m, facts), row.action == "failed",
                              next_text(row, on.get(change.address))))
    return TableView(out, len(kept), page, pages)


def last_error(m: MigrationView | None) -> dict[str, str]:
    """The errors mapping `row_of` takes, for one migration."""
    return {m.address: m.failed_reason or m.last_error or ""} if m is not None else {}


def failures(snap: Snapshot, only: str | None = None) -> list[Failure]:
    """Every failed or blocked migration, or one waiting for a manual step (of `only`, an
    address, if given), with its reason and what gets it going again."""
    found = []
    for change in snap.plan.changes:
        if (change.action not in BLOCKED and change.action != "manual") or (
                only is not None and change.address != only):
            continue
        m = snap.migrations.get(change.address)
        reason = change.reason or (m.failed_reason if m else "") or ""
        if change.action == "failed":
            command = f"reconcile retry {change.address}"
        elif change.action == "manual":  # a person's step: the reason says which
            command = "do it there; mailferry rechecks it every 30 s"
        elif change.action == "refused":
            command = "put the spec back (the move is past its hold), then: reconcile --apply"
        else:
            command = "fix the specs or the system, then: reconcile --apply"
        found.append(Failure(
            address=change.address, placement=change.placement or "-",
            state="-" if change.state is None else str(change.state),
            step=(m.failed_step if m and m.failed_step else change.step) or "-",
            action=change.action, reason=reason, command=command))
    return found


def suspended_commands(snap: Snapshot) -> list[tuple[str, str]]:
    """(placement, the command resuming it) for every suspended placement."""
    return [(p, f"reconcile resume {p}") for p in sorted(snap.suspended)]


def state_filters(snap: Snapshot) -> dict[str, list[str]]:
    """The choices of the table's filters."""
    systems = sorted({s for c in snap.plan.changes for s in (c.source, c.target) if s})
    return {"placements": sorted(set(snap.placements) | {c.placement for c in snap.plan.changes
                                                         if c.placement}),
            "systems": systems}


@dataclass(frozen=True)
class EventFacts:
    at: datetime
    step: str
    from_state: int | None
    to_state: int | None
    commit: str | None
    detail: str


@dataclass(frozen=True)
class ReportFacts:
    at: datetime
    station: str
    kind: str
    ok: bool
    detail: str


@dataclass
class TimelineStep:
    state: int
    steps: str
    text: str
    at: datetime | None
    reached: bool
    current: bool


@dataclass
class MailboxDetail:
    address: str
    row: StatusRow | None
    migration: MigrationView | None
    timeline: list[TimelineStep]
    events: list[EventFacts]
    hold: str
    folders: list[dict[str, Any]]
    copy: str
    live: str
    reports: list[ReportFacts]
    failure: Failure | None
    jobs: list[JobLine] = field(default_factory=list)  # its data jobs on the workers


def timeline(events: list[EventFacts], m: MigrationView | None) -> list[TimelineStep]:
    """States 0-13 with the time each was (last) reached."""
    reached_at: dict[int, datetime] = {}
    for e in events:
        if e.to_state is not None and e.to_state != e.from_state:
            reached_at[e.to_state] = e.at
        elif e.to_state == MigrationState.RECORDED and e.from_state is None:
            reached_at[0] = e.at
    current = m.state if m is not None else None
    return [TimelineStep(n, steps, text, reached_at.get(n),
                         current is not None and (n <= current) and
                         (n in reached_at or n == current), n == current)
            for n, steps, text in STATES]


def hold_text(m: MigrationView | None, hold_started: datetime | None, events: list[EventFacts],
              fed_hold: dict[str, Any] | None, now: datetime) -> str:
    """How long mail for this address was (or is) held."""
    if fed_hold is not None:
        return (f"held now for {human_duration(float(fed_hold.get('age_s', 0)))}, "
                f"{fed_hold.get('waiting', 0)} messages waiting at fed")
    if hold_started is None:
        return "no hold yet"
    released = next((e.at for e in events if e.step == "E9" and e.at >= hold_started), None)
    if released is not None:
        return (f"held {(released - hold_started).total_seconds():.1f} s "
                f"(from {hold_started:%H:%M:%S} to {released:%H:%M:%S}Z)")
    return f"held since {hold_started:%Y-%m-%d %H:%M:%S}Z " \
           f"({human_duration((now - hold_started).total_seconds())})"


def mailbox_detail(address: str, snap: Snapshot, *, hold_started: datetime | None,
                   events: list[EventFacts], folders: list[dict[str, Any]],
                   reports: list[ReportFacts]) -> MailboxDetail:
    """PURE: the mailbox page."""
    m = snap.migrations.get(address)
    rows = [row_of(c, last_error(m), snap.plan.at) for c in snap.plan.changes
            if c.address == address]
    facts = snap.copies.get(m.id) if m is not None else None
    fed_hold = next((h for h in snap.fed.holds if h["address"] == address), None)
    failure = next((f for f in failures(snap, only=address)), None)
    live = ""
    if facts is not None and facts.running:
        total = facts.bytes_total or 0
        live = (f"copying now: {facts.messages_done}/{facts.messages_total or 0} messages, "
                f"{human_bytes(facts.bytes_done)} of {human_bytes(total)}")
    return MailboxDetail(
        address=address, row=rows[0] if rows else None, migration=m,
        timeline=timeline(events, m), events=events,
        hold=hold_text(m, hold_started, events, fed_hold, snap.at), folders=folders,
        copy=copy_text(m, facts), live=live, reports=reports, failure=failure,
        jobs=snap.jobs.of(address))
