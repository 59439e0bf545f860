"""Will the data still to move for a window fit in it? A warning in the plan when not.

Why: a wave is planned weeks ahead for, say, Friday 20:00-24:00. If the mailboxes of that
wave hold 2 TB and the data mover has been copying at 40 MB/s, the copy takes 14 hours and
Monday morning starts with half the wave still copying (mail flows, nothing is lost, but
users miss their old mail). The admin should learn that at review time, in the plan, and
split the wave or widen the window.

The estimate, per window:

- *data still to move*: the source size of every mailbox of the window's placements whose
  old mail is not copied yet (a migration before state 8 with a copying mode, or a move not
  recorded yet). The size is the one the station reported (E23) when there is one, else the
  source driver's `mailbox_info`; at most `MAX_LOOKUPS` mailboxes are measured per plan
  (each costs a walk of the mailbox) and the others are counted at the measured mean;
- *messages still to move*: the message count the source driver reports with the size;
  mailboxes known only by their size (a station's report) count at the measured mean;
- *time*: the data mover's own estimate, `mover.manifest.estimate_seconds`: the bytes and
  the messages at the byte and message rates of the recent data mover runs
  (`transfer_runs`), whichever takes longer (a mailbox of many small messages is bound by
  round trips, not bytes). What this installation really achieves, not a nominal figure;
  no run yet, no estimate (and no warning: a guess would be noise);
- *window length*: the open period containing now, or the next one if closed.

`window_fit` is pure (numbers in, a message or None out, the time from the same
`seconds_for` as `estimate_seconds`); `window_warnings_for` gathers the
numbers (state store, drivers) for the engine. Sizes are read only for `--plan`, never in
the apply passes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from mailferry.mail.addresses import split_physical
from reconciler.drivers.base import MailSystemDriver
from reconciler.humanize import human_bytes, human_duration
from reconciler.mover.manifest import RECENT_RUNS, seconds_for, throughput
from reconciler.plan import MigrationView, Plan
from reconciler.spec.model import DesiredMailbox, WindowSpec
from reconciler.spec.modes import COPYING
from reconciler.spec.windows import next_open, open_until
from reconciler.state.states import MigrationState
from reconciler.state.store import Store

MAX_LOOKUPS = 2000  # mailbox sizes measured per plan; the rest count at the mean


@dataclass
class WindowLoad:
    """What still has to be copied inside one window."""

    mailboxes: int = 0
    measured_bytes: int = 0
    measured: int = 0
    unknown: int = 0  # mailboxes whose size was not measured (counted at the mean)
    measured_messages: int = 0
    counted: int = 0  # mailboxes whose message count is known

    @property
    def estimated_bytes(self) -> float:
        mean = self.measured_bytes / self.measured if self.measured else 0.0
        return self.measured_bytes + mean * self.unknown

    @property
    def estimated_messages(self) -> float:
        mean = self.measured_messages / self.counted if self.counted else 0.0
        return self.measured_messages + mean * (self.mailboxes - self.counted)


@dataclass
class _Sizes:
    """Mailbox sizes, measured at most `budget` times."""

    drivers: Mapping[str, MailSystemDriver]
    budget: int = MAX_LOOKUPS
    cache: dict[tuple[str, str], tuple[int, int] | None] = field(default_factory=dict)

    def size(self, system: str, mailbox: str) -> tuple[int, int] | None:
        """(bytes, messages) of a mailbox, or None when it cannot be measured."""
        key = (system, mailbox)
        if key not in self.cache:
            if self.budget <= 0 or system not in self.drivers:
                return None
            self.budget -= 1
            try:
                info = self.drivers[system].mailbox_info(mailbox)
                self.cache[key] = (info.size_bytes, info.messages)
            except Exception:  # a system down or a mailbox gone: no estimate for it
                self.cache[key] = None
        return self.cache[key]


def window_fit(window: WindowSpec, now: datetime, load: WindowLoad,
               rates: tuple[float, float] | None) -> str | None:
    """PURE: a warning when `load` at `rates` (bytes/s, messages/s, see `throughput`)
    outlasts the window's (next) open period."""
    if rates is None or max(rates) <= 0 or load.mailboxes == 0:
        return None
    opens = next_open(window, now)
    if opens is None:
        return None
    closes = open_until(window, opens)
    if closes is None:
        return None
    length = (closes - opens).total_seconds()
    needed = seconds_for(rates, load.estimated_messages, load.estimated_bytes)
    if needed <= length:
        return None
    when = "open now" if opens <= now else f"opens {opens:%Y-%m-%dT%H:%M}Z"
    guess = f", {load.unknown} of them counted at the mean size" if load.unknown else ""
    return (f"window {window.name} ({when}, {human_duration(length)} long): "
            f"{human_bytes(load.estimated_bytes)} still to copy for {load.mailboxes} mailboxes"
            f"{guess} take about {human_duration(needed)} at the measured "
            f"{human_bytes(rates[0])}/s and {rates[1]:.0f} messages/s: it will not fit")


def window_warnings_for(
    store: Store, drivers: Mapping[str, MailSystemDriver], desired: Mapping[str, DesiredMailbox],
    plan: Plan, migrations: Sequence[MigrationView], directory: Mapping[str, str],
) -> list[str]:
    """The window-fit warnings of `plan` (reads the rate and the mailbox sizes).

    Given the engine's parts, not the engine: the engine imports this module."""
    with store.session() as session:
        rates = throughput(session, RECENT_RUNS)
    if rates is None:
        return []
    latest = {m.address: m for m in migrations}
    loads: dict[str, WindowLoad] = defaultdict(WindowLoad)
    windows: dict[str, WindowSpec] = {}
    sizes = _Sizes(drivers)
    for change in plan.changes:
        want = desired.get(change.address)
        if want is None or want.window is None:
            continue
        if change.action == "migrate":
            if want.policy.data_transfer not in COPYING:
                continue
            where = split_physical(directory.get(change.address, ""))
            system, mailbox = where if where else ("", "")
            known: int | None = None
        elif change.action in ("step", "wait") and change.state is not None \
                and change.state < MigrationState.DATA_COPIED and change.address in latest:
            m = latest[change.address]
            if not m.modes.copies_mail:
                continue
            system, mailbox, known = m.source_system, m.source_mailbox, m.mailbox_size
        else:
            continue
        load = loads[want.window.name]
        windows[want.window.name] = want.window
        load.mailboxes += 1
        measured = sizes.size(system, mailbox) if known is None else None
        size = known if known is not None else (measured[0] if measured else None)
        if size is None:
            load.unknown += 1
        else:
            load.measured += 1
            load.measured_bytes += size
        if measured is not None:
            load.counted += 1
            load.measured_messages += measured[1]
    warnings = []
    for name in sorted(loads):
        text = window_fit(windows[name], plan.at, loads[name], rates)
        if text:
            warnings.append(text)
    return warnings

