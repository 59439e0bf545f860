"""Window evaluation: absolute ranges, cron across DST, deny over allow, next_open/open_until."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from reconciler.spec.model import SourceLocation, WindowRule, WindowSpec
from reconciler.spec.windows import is_open, next_open, open_until

HERE = SourceLocation("test", 1)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> datetime:
    """A UTC datetime."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def window(*rules: WindowRule, tz: str = "UTC") -> WindowSpec:
    """A window with these rules."""
    return WindowSpec(name="w", time_zone=tz, rules=rules, location=HERE)


def allow(start: datetime, end: datetime) -> WindowRule:
    return WindowRule(kind="allow", start=start, end=end)


def deny(start: datetime, end: datetime) -> WindowRule:
    return WindowRule(kind="deny", start=start, end=end)


def cron(kind: str, schedule: str, hours: float) -> WindowRule:
    return WindowRule(kind=kind, schedule=schedule, duration=timedelta(hours=hours))  # type: ignore[arg-type]


# -- no window, no rules ---------------------------------------------------------------------


def test_none_window_is_always_open() -> None:
    at = utc(2026, 6, 1, 12)
    assert is_open(None, at)
    assert next_open(None, at) == at
    assert open_until(None, at) is None


def test_window_without_rules_is_always_open() -> None:
    at = utc(2026, 6, 1, 12)
    assert is_open(window(), at)
    assert next_open(window(), at) == at
    assert open_until(window(), at) is None


# -- absolute ranges ------------------------------------------------------------------------


def test_absolute_range_is_half_open() -> None:
    w = window(allow(utc(2026, 5, 1), utc(2026, 5, 2)))
    assert not is_open(w, utc(2026, 4, 30, 23, 59))
    assert is_open(w, utc(2026, 5, 1))
    assert is_open(w, utc(2026, 5, 1, 23, 59, 59))
    assert not is_open(w, utc(2026, 5, 2))


def test_absolute_next_open_and_open_until() -> None:
    w = window(allow(utc(2026, 5, 1), utc(2026, 5, 2)))
    assert next_open(w, utc(2026, 4, 1)) == utc(2026, 5, 1)
    assert next_open(w, utc(2026, 5, 1, 6)) == utc(2026, 5, 1, 6)  # open now: now
    assert next_open(w, utc(2026, 5, 2)) is None  # never again
    assert open_until(w, utc(2026, 5, 1, 6)) == utc(2026, 5, 2)
    assert open_until(w, utc(2026, 4, 1)) == utc(2026, 4, 1)  # closed: "until now"


def test_touching_and_overlapping_allows_chain() -> None:
    w = window(allow(utc(2026, 5, 1), utc(2026, 5, 2)), allow(utc(2026, 5, 2), utc(2026, 5, 4)),
               allow(utc(2026, 5, 3), utc(2026, 5, 6)))
    assert open_until(w, utc(2026, 5, 1, 12)) == utc(2026, 5, 6)


def test_next_open_beyond_horizon_is_none() -> None:
    w = window(allow(utc(2028, 1, 1), utc(2028, 1, 2)))
    assert next_open(w, utc(2026, 1, 1)) is None  # 730 days > 400-day horizon
    assert next_open(w, utc(2027, 1, 1)) == utc(2028, 1, 1)


def test_other_offsets_in_utc_out() -> None:
    paris_summer = timezone(timedelta(hours=2))
    w = window(allow(datetime(2026, 5, 1, 2, tzinfo=paris_summer), utc(2026, 5, 2)))
    result = next_open(w, datetime(2026, 4, 30, 12, tzinfo=paris_summer))
    assert result == utc(2026, 5, 1, 0) and result is not None and result.tzinfo is UTC
    assert open_until(w, utc(2026, 5, 1, 1)) == utc(2026, 5, 2)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError):
        is_open(window(), datetime(2026, 1, 1))


# -- deny wins -------------------------------------------------------------------------------


def test_deny_overrides_allow() -> None:
    w = window(allow(utc(2026, 1, 1), utc(2027, 1, 1)), deny(utc(2026, 12, 24), utc(2026, 12, 26)))
    assert is_open(w, utc(2026, 12, 23, 23))
    assert not is_open(w, utc(2026, 12, 24, 12))
    assert next_open(w, utc(2026, 12, 24, 12)) == utc(2026, 12, 26)
    assert open_until(w, utc(2026, 12, 20)) == utc(2026, 12, 24)
    assert open_until(w, utc(2026, 12, 27)) == utc(2027, 1, 1)


def test_deny_only_window() -> None:
    w = window(deny(utc(2026, 3, 1), utc(2026, 3, 2)))
    assert is_open(w, utc(2026, 2, 1))
    assert open_until(w, utc(2026, 2, 1)) == utc(2026, 3, 1)
    assert next_open(w, utc(2026, 3, 1, 5)) == utc(2026, 3, 2)
    assert open_until(w, utc(2026, 3, 2)) is None


def test_overlapping_denies_must_all_end() -> None:
    w = window(deny(utc(2026, 3, 1), utc(2026, 3, 3)), deny(utc(2026, 3, 2), utc(2026, 3, 5)))
    assert next_open(w, utc(2026, 3, 1, 1)) == utc(2026, 3, 5)


def test_permanent_deny_never_opens() -> None:
    w = window(cron("deny", "0 0 * * *", 24))
    assert not is_open(w, utc(2026, 6, 1, 12))
    assert next_open(w, utc(2026, 6, 1, 12)) is None


# -- recurring rules and DST (Europe/Paris: +01:00 in winter, +02:00 in summer) ----------------


WEEKNIGHTS = window(cron("allow", "0 20 * * 1-5", 4), tz="Europe/Paris")


def test_cron_window_follows_local_time_across_spring_change() -> None:
    # Friday 27 March 2026, still CET: 20:00 Paris = 19:00 UTC.
    assert not is_open(WEEKNIGHTS, utc(2026, 3, 27, 18, 59))
    assert is_open(WEEKNIGHTS, utc(2026, 3, 27, 19, 0))
    assert open_until(WEEKNIGHTS, utc(2026, 3, 27, 20)) == utc(2026, 3, 27, 23)
    # Clocks go forward on Sunday 29 March; Monday 30, CEST: 20:00 Paris = 18:00 UTC.
    assert next_open(WEEKNIGHTS, utc(2026, 3, 28, 12)) == utc(2026, 3, 30, 18)
    assert is_open(WEEKNIGHTS, utc(2026, 3, 30, 18, 30))
    assert not is_open(WEEKNIGHTS, utc(2026, 3, 30, 22))
    assert open_until(WEEKNIGHTS, utc(2026, 3, 30, 18, 30)) == utc(2026, 3, 30, 22)


def test_cron_window_across_autumn_change() -> None:
    # Friday 23 October 2026 is CEST (18:00 UTC); Monday 26 is CET again (19:00 UTC).
    assert next_open(WEEKNIGHTS, utc(2026, 10, 23, 12)) == utc(2026, 10, 23, 18)
    assert next_open(WEEKNIGHTS, utc(2026, 10, 24, 12)) == utc(2026, 10, 26, 19)


def test_skipped_wall_time_opens_just_after_the_gap() -> None:
    # 02:30 does not exist in Paris on 29 March 2026: the rule opens at 03:30 CEST (01:30 UTC).
    w = window(cron("allow", "30 2 * * *", 1), tz="Europe/Paris")
    assert next_open(w, utc(2026, 3, 28, 3)) == utc(2026, 3, 29, 1, 30)
    assert next_open(w, utc(2026, 3, 29, 3)) == utc(2026, 3, 30, 0, 30)  # 02:30 CEST


def test_repeated_wall_time_happens_once_and_duration_is_elapsed() -> None:
    # 02:30 happens twice in Paris on 25 October 2026; the rule opens at the first one only.
    w = window(cron("allow", "30 2 * * *", 1), tz="Europe/Paris")
    assert is_open(w, utc(2026, 10, 25, 0, 45))  # 02:45 CEST
    assert not is_open(w, utc(2026, 10, 25, 1, 45))  # 02:45 CET, the second time round
    # A 4h rule opening at 01:00 CEST closes four real hours later, at 04:00 CET.
    night = window(cron("allow", "0 1 * * *", 4), tz="Europe/Paris")
    assert open_until(night, utc(2026, 10, 24, 23, 30)) == utc(2026, 10, 25, 3)


def test_cron_deny_over_cron_allow_christmas() -> None:
    w = window(cron("allow", "0 20 * * 1-5", 4), cron("deny", "0 0 24 12 *", 48),
               tz="Europe/Paris")
    # Wednesday 23 December: open from 19:00 UTC, cut at midnight Paris when the deny begins.
    assert open_until(w, utc(2026, 12, 23, 20)) == utc(2026, 12, 23, 23)
    # Thursday 24 and Friday 25 are denied, then the weekend: Monday 28, 20:00 CET.
    assert not is_open(w, utc(2026, 12, 24, 20))
    assert next_open(w, utc(2026, 12, 24, 12)) == utc(2026, 12, 28, 19)


def test_overlapping_cron_occurrences_chain() -> None:
    w = window(cron("allow", "0 */2 * * *", 3), tz="UTC")  # every 2h for 3h: always open
    assert is_open(w, utc(2026, 6, 1, 1, 59))
    assert open_until(w, utc(2026, 6, 1, 12)) is None  # open beyond the horizon


def test_calls_are_cheap() -> None:
    w = window(cron("allow", "0 20 * * 1-5", 4), cron("deny", "0 0 24 12 *", 48),
               tz="Europe/Paris")
    at = utc(2026, 12, 20, 12)
    next_open(w, at)  # warm the occurrence cache
    started = time.perf_counter()
    for i in range(20_000):
        moment = at + timedelta(minutes=i)
        is_open(w, moment)
        next_open(w, moment)
        open_until(w, moment)
    assert time.perf_counter() - started < 10  # ~1 s on a laptop; generous for slow CI
