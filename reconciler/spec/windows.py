"""When may a mailbox move? Evaluation of MigrationWindow rules, in the manner of Argo CD.

A window is a list of rules, each `allow` or `deny`, each either an absolute range
``[start, end)`` or a recurring one: a cron `schedule` that opens for `duration`. As with
Argo CD sync windows, an instant is *open* when it lies inside at least one allow rule (or
the window has no allow rule at all) and inside no deny rule: deny always wins. That keeps
the admin's mental model additive ("weeknights, but never over Christmas") and makes a
freeze a one-line change. A placement without a window is always open (``None`` here).

Time zones: cron schedules are evaluated in the window's time zone, on local wall-clock
time, so "0 20 * * 1-5" means 20:00 in Paris in winter and in summer. Occurrences are
generated as naive local times and converted with zoneinfo: a wall time skipped by a
spring-forward change maps to the instant just after the gap (as zoneinfo's fold=0 does),
a wall time repeated by the autumn change happens once, at its first occurrence. `duration`
is elapsed time, not wall time: a 4h window opening at 01:00 on the night the clocks go
back closes at 04:00 wall time, after four real hours (the wall clock shows five), which is
what an admin who budgets "4 hours of migration work" means.

Cost: the plan asks these questions for up to 100,000 mailboxes per pass, while a croniter
step costs ~100 µs. So occurrences of each (schedule, time zone) are generated once into a
sorted timeline that grows on demand and are then found by bisection; a call costs a few
bisections per rule. The cache is keyed by value (schedule and zone), holds at most
`_CACHE_SIZE` timelines and is guarded by a lock (the watch loop and the plan may share it).
Nothing here ever scans minute by minute.

PURE: no I/O (the cache is memory only). All datetimes in and out are aware; results are UTC.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import cast
from zoneinfo import ZoneInfo

from croniter import croniter

from .model import WindowRule, WindowSpec

HORIZON = timedelta(days=400)  # how far next_open / open_until look ahead
_CHUNK = timedelta(days=8)  # occurrences generated per growth step (a week and a bit)
_FAR = timedelta(days=60)  # a query this far from a timeline restarts it instead of growing it
_SLACK = timedelta(hours=3)  # wider than any DST shift: naive-local scans start/stop this early
_CACHE_SIZE = 64
_MAX_STEPS = 100_000  # guard against pathological rule sets (e.g. a deny every minute)


class _Timeline:
    """Sorted UTC start instants of one cron schedule, complete over [lo, hi)."""

    def __init__(self, schedule: str, zone: ZoneInfo) -> None:
        self.schedule = schedule
        self.zone = zone
        self.starts: list[datetime] = []
        self.lo: datetime | None = None
        self.hi: datetime | None = None

    def _generate(self, lo: datetime, hi: datetime) -> list[datetime]:
        """Every occurrence in [lo, hi), as UTC instants, by stepping croniter on wall time."""
        local_lo = lo.astimezone(self.zone).replace(tzinfo=None) - _SLACK
        local_hi = hi.astimezone(self.zone).replace(tzinfo=None) + _SLACK
        # croniter returns occurrences strictly after its start: begin one second early.
        it = croniter(self.schedule, local_lo - timedelta(seconds=1))
        found: list[datetime] = []
        while True:
            wall: datetime = it.get_next(datetime)
            if wall >= local_hi:
                break
            instant = wall.replace(tzinfo=self.zone).astimezone(UTC)
            if lo <= instant < hi:
                found.append(instant)
        # The wall-clock to UTC mapping is not monotonic across an autumn change.
        found.sort()
        return found

    def ensure(self, lo: datetime, hi: datetime) -> None:
        """Make the timeline complete over [lo, hi), growing or restarting it."""
        if self.lo is None or self.hi is None or hi < self.lo - _FAR or lo > self.hi + _FAR:
            self.starts = self._generate(lo, hi)
            self.lo, self.hi = lo, hi
            return
        if lo < self.lo:
            self.starts = self._generate(lo, self.lo) + self.starts
            self.lo = lo
        if hi > self.hi:
            self.starts = self.starts + self._generate(self.hi, hi)
            self.hi = hi

    def last_at_or_before(self, at: datetime, since: datetime) -> datetime | None:
        """The latest start in [since, at], or None."""
        self.ensure(since, at + timedelta(microseconds=1))
        i = bisect_right(self.starts, at)
        if i and self.starts[i - 1] >= since:
            return self.starts[i - 1]
        return None

    def run_end(self, at: datetime, duration: timedelta, limit: datetime) -> datetime | None:
        """End of the unbroken run of overlapping occurrences covering `at` (None: not covered).

        Stops once past `limit`. Scans the generated list, never croniter step by step, so
        an "every 2h for 3h" rule costs microseconds per occurrence, not a full lookup each.
        """
        start = self.last_at_or_before(at, at - duration)
        if start is None or start + duration <= at:
            return None
        end = start + duration
        i = bisect_right(self.starts, at) - 1
        while end <= limit:
            if self.hi is not None and self.hi <= end:
                self.ensure(cast(datetime, self.lo), end + _CHUNK)  # append only
            if i + 1 < len(self.starts) and self.starts[i + 1] <= end:
                i += 1
                end = self.starts[i] + duration
                continue
            break
        return end

    def first_after(self, at: datetime, limit: datetime) -> datetime | None:
        """The earliest start in (at, limit], or None; grows chunk by chunk up to `limit`."""
        if self.lo is not None and self.hi is not None and self.lo <= at < self.hi:
            # Usual case: answer from what is already generated, with a single bisection.
            i = bisect_right(self.starts, at)
            if i < len(self.starts):
                return self.starts[i] if self.starts[i] <= limit else None
            if self.hi > limit:
                return None
            lo = self.hi
        else:
            lo = at
        while lo <= limit:
            hi = min(lo + _CHUNK, limit + timedelta(microseconds=1))
            self.ensure(lo, hi)
            i = bisect_right(self.starts, at)
            if i < len(self.starts) and self.starts[i] < hi:
                return self.starts[i]
            lo = hi
        return None


_cache: OrderedDict[tuple[str, str], _Timeline] = OrderedDict()
_lock = threading.Lock()


def _timeline(schedule: str, time_zone: str) -> _Timeline:
    """The shared timeline of a (schedule, zone); callers hold `_lock`."""
    key = (schedule, time_zone)
    found = _cache.get(key)
    if found is None:
        found = _cache[key] = _Timeline(schedule, ZoneInfo(time_zone))
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return found


def _utc(at: datetime) -> datetime:
    """`at` in UTC; naive datetimes are refused (they are ambiguous by nature)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"aware datetime required, got naive {at.isoformat()}")
    return at.astimezone(UTC)


def _covering_end(
    rule: WindowRule, zone: str, at: datetime, limit: datetime | None = None
) -> datetime | None:
    """If `rule` covers `at`, the end of its coverage, else None.

    With a `limit`, a recurring rule's coverage runs on through overlapping or touching
    occurrences (up to just past `limit`); without, it is the single occurrence's end.
    """
    if rule.start is not None and rule.end is not None:
        return _utc(rule.end) if rule.start <= at < rule.end else None
    if rule.schedule is not None and rule.duration is not None and rule.duration > timedelta(0):
        timeline = _timeline(rule.schedule, zone)
        if limit is not None:
            return timeline.run_end(at, rule.duration, limit)
        # The latest occurrence at or before `at` gives the furthest end among those covering.
        start = timeline.last_at_or_before(at, at - rule.duration)
        if start is not None and start + rule.duration > at:
            return start + rule.duration
    return None


def _next_start(rule: WindowRule, zone: str, at: datetime, limit: datetime) -> datetime | None:
    """The first instant in (at, limit] at which `rule` begins a new interval, or None."""
    if rule.start is not None and rule.end is not None:
        start = _utc(rule.start)
        return start if at < start <= limit and rule.end > rule.start else None
    if rule.schedule is not None and rule.duration is not None and rule.duration > timedelta(0):
        return _timeline(rule.schedule, zone).first_after(at, limit)
    return None


def _split(window: WindowSpec) -> tuple[list[WindowRule], list[WindowRule]]:
    """(allow rules, deny rules)."""
    allows = [r for r in window.rules if r.kind == "allow"]
    denies = [r for r in window.rules if r.kind == "deny"]
    return allows, denies


def _allow_end(
    allows: list[WindowRule], zone: str, at: datetime, limit: datetime | None = None
) -> datetime | None:
    """Latest end among allow intervals covering `at` (None: none covers)."""
    ends = [e for r in allows if (e := _covering_end(r, zone, at, limit)) is not None]
    return max(ends) if ends else None


def _is_open(window: WindowSpec, at: datetime) -> bool:
    """`is_open` on a UTC instant, lock held."""
    allows, denies = _split(window)
    zone = window.time_zone
    if allows and _allow_end(allows, zone, at) is None:
        return False
    return all(_covering_end(r, zone, at) is None for r in denies)


def is_open(window: WindowSpec | None, at: datetime) -> bool:
    """True if a migration may run at `at` (no window: always)."""
    if window is None:
        return True
    instant = _utc(at)
    with _lock:
        return _is_open(window, instant)


def next_open(window: WindowSpec | None, at: datetime) -> datetime | None:
    """`at` if open now, else the earliest later open instant within 400 days, else None."""
    instant = _utc(at)
    if window is None:
        return instant
    allows, denies = _split(window)
    zone = window.time_zone
    limit = instant + HORIZON
    t = instant
    with _lock:
        for _ in range(_MAX_STEPS):
            if t > limit:
                return None
            if allows and _allow_end(allows, zone, t) is None:
                # Closed for lack of an allow: jump to the next allow opening.
                starts = [s for r in allows if (s := _next_start(r, zone, t, limit)) is not None]
                if not starts:
                    return None
                t = min(starts)
                continue
            deny_ends = [e for r in denies if (e := _covering_end(r, zone, t, limit)) is not None]
            if deny_ends:
                # Denied: nothing can open before every deny covering t has ended.
                t = max(deny_ends)
                continue
            return t
    return None


def open_until(window: WindowSpec | None, at: datetime) -> datetime | None:
    """End of the open period containing `at` (None: unbounded); `at` itself if closed now.

    "Unbounded" also covers an open period that lasts beyond the 400-day horizon.
    """
    instant = _utc(at)
    if window is None:
        return None
    allows, denies = _split(window)
    zone = window.time_zone
    limit = instant + HORIZON
    with _lock:
        if not _is_open(window, instant):
            return instant
        # How long do allow rules keep covering, chaining overlapping or touching intervals?
        end: datetime | None = None
        if allows:
            t = instant
            for _ in range(_MAX_STEPS):
                covered_until = _allow_end(allows, zone, t, limit)
                if covered_until is None:
                    break
                t = covered_until
                if t > limit:
                    break
            end = None if t > limit else t
        # The first deny starting later cuts the period short (none covers `instant`).
        deny_starts = [s for r in denies if (s := _next_start(r, zone, instant, limit)) is not None]
        if deny_starts:
            first_deny = min(deny_starts)
            end = first_deny if end is None else min(end, first_deny)
        return end
