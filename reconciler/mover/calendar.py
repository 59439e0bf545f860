"""Merge diary (calendar) data from BOX1 into BOX2 (patent E16-E17).

Why a merge and not a copy: by the time the data mover runs, BOX2 is live. Its owner may
already have accepted an invitation or edited an event there, and the mover may run again
after a crash. Overwriting BOX2's calendar with BOX1's would lose those changes; appending
would duplicate events. So components are matched by identity, UID plus RECURRENCE-ID (an
edited occurrence of a recurring event shares its UID with the series), and a source
component replaces the target's only when it is newer by iCalendar's own rules: higher
SEQUENCE, or the same SEQUENCE and a later LAST-MODIFIED (DTSTAMP when absent).

Idempotence is what makes this safe to re-run: when nothing is newer, the target bytes are
returned untouched with a count of 0, so `copy_diary` writes nothing at all. Time zones
(VTIMEZONE) the source defines and the target lacks are carried over with added components,
because an event's TZID must resolve in the target document.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from icalendar import Calendar, Component

from reconciler.drivers.base import MailSystemDriver
from reconciler.errors import PermanentError

ITEM_KINDS = ("VEVENT", "VTODO", "VJOURNAL")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _key(comp: Component) -> tuple[str, str]:
    """Identity of a component: UID and RECURRENCE-ID (as text, '' when absent)."""
    rid = comp.get("RECURRENCE-ID")
    rid_text = "" if rid is None else _when(rid).isoformat()
    return str(comp.get("UID", "")), rid_text


def _when(prop: Any) -> datetime:
    """A date-time property as an aware datetime (naive and date values taken as UTC)."""
    value = getattr(prop, "dt", prop)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return _EPOCH


def _version(comp: Component) -> tuple[int, datetime]:
    """(SEQUENCE, LAST-MODIFIED or DTSTAMP): the order in which versions supersede."""
    try:
        seq = int(comp.get("SEQUENCE", 0))
    except (TypeError, ValueError):
        seq = 0
    stamp = comp.get("LAST-MODIFIED") or comp.get("DTSTAMP")
    return seq, _when(stamp) if stamp is not None else _EPOCH


def _items(cal: Component) -> list[Component]:
    return [c for c in cal.subcomponents if c.name in ITEM_KINDS]


def merge_calendars(source_ics: bytes, target_ics: bytes | None) -> tuple[bytes, int]:
    """(merged document, components added or updated); the target unchanged when 0."""
    source = Calendar.from_ical(source_ics)
    if target_ics is None or not target_ics.strip():
        return source_ics, len(_items(source))
    target = Calendar.from_ical(target_ics)
    position = {_key(c): i for i, c in enumerate(target.subcomponents) if c.name in ITEM_KINDS}
    changed = 0
    for comp in _items(source):
        key = _key(comp)
        if not key[0]:
            continue  # without a UID a component has no identity to merge on
        if key not in position:
            target.add_component(comp)
            position[key] = len(target.subcomponents) - 1
            changed += 1
        elif _version(comp) > _version(target.subcomponents[position[key]]):
            target.subcomponents[position[key]] = comp
            changed += 1
    if changed == 0:
        return target_ics, 0
    known_tz = {str(c.get("TZID")) for c in target.subcomponents if c.name == "VTIMEZONE"}
    for tz in source.subcomponents:
        if tz.name == "VTIMEZONE" and str(tz.get("TZID")) not in known_tz:
            # VTIMEZONE must precede the components using it in many clients' eyes.
            target.subcomponents.insert(0, tz)
    return bytes(target.to_ical()), changed


def missing_items(source_ics: bytes, target_ics: bytes | None) -> list[str]:
    """UIDs of source components the target lacks or holds in an older version."""
    source = Calendar.from_ical(source_ics)
    have = {} if target_ics is None else {
        _key(c): _version(c) for c in _items(Calendar.from_ical(target_ics))
    }
    return [_key(c)[0] for c in _items(source)
            if _key(c)[0] and (_key(c) not in have or have[_key(c)] < _version(c))]


def verify_diary(src: MailSystemDriver, src_id: str, dst: MailSystemDriver,
                 dst_id: str) -> list[str]:
    """UIDs of BOX1's diary components missing (or older) in BOX2's; empty = verified."""
    source = src.read_diary(src_id)
    return [] if source is None else missing_items(source, dst.read_diary(dst_id))


def copy_diary(src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str) -> int:
    """Merge BOX1's diary into BOX2's; write only when something changed; return the count."""
    source = src.read_diary(src_id)
    if source is None:
        return 0
    try:
        merged, changed = merge_calendars(source, dst.read_diary(dst_id))
    except ValueError as exc:
        # Retrying cannot fix a document that does not parse: an admin must look.
        raise PermanentError(f"diary of {src_id} or {dst_id} does not parse: {exc}") from exc
    if changed:
        dst.write_diary(dst_id, merged)
    return changed
