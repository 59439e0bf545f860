"""IMAP's INTERNALDATE (RFC 3501 ``date-time``) <-> seconds since the epoch."""

from __future__ import annotations

from datetime import UTC, datetime

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imap_date(epoch: float) -> str:
    """Epoch seconds -> INTERNALDATE text (UTC)."""
    t = datetime.fromtimestamp(epoch, UTC)
    return f"{t.day:02d}-{_MONTHS[t.month - 1]}-{t.year} {t:%H:%M:%S} +0000"


def epoch_of(date: str | None) -> float | None:
    """INTERNALDATE text -> epoch seconds (None when absent or unparsable)."""
    if not date:
        return None
    # Imported here: only a copy into a driver's store parses dates, and email.utils is
    # 3 ms of every `mover copy` process's start otherwise (issue 22).
    from email.utils import parsedate_to_datetime
    try:
        day, rest = date.strip().split("-", 1)
        return parsedate_to_datetime(f"{int(day):02d}-{rest}".replace("-", " ", 2)).timestamp()
    except (ValueError, TypeError, IndexError):
        return None
