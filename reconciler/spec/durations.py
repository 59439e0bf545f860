"""Durations as admins write them in specs: ``30s``, ``15m``, ``4h``, ``1h30m``, ``7d``, ``2w``.

Why a home-made format rather than ISO 8601 (``PT1H30M``) or a number of seconds: specs are
written and reviewed by people, in pull requests, and the Go-style compact form (as used by
Argo CD sync windows, Kubernetes and Prometheus) is what GitOps admins already read at a
glance. ISO 8601 durations also admit months and years, whose length depends on the calendar;
every unit here has a fixed length, so a duration is an exact `timedelta` and "delete the
source 7d after the move" means 604800 seconds, whatever the month or a DST change does.

The grammar is the one the JSON Schemas enforce: one or more ``<digits><unit>`` groups with
units ``w d h m s``, or the bare ``0``. Units may repeat and come in any order (``1h1h`` is
two hours): the schema pattern cannot forbid it cheaply and nothing goes wrong with it, so
the parser accepts exactly what the schema accepts. `format_duration` writes the canonical
form back (largest units first, zero parts omitted), used by the plan and error messages.

PURE: no I/O.
"""

from __future__ import annotations

import re
from datetime import timedelta

# The same grammar as the schemas' duration pattern; kept in one place on the Python side.
DURATION_RE = re.compile(r"^(0|([0-9]+(w|d|h|m|s))+)$")
_PART_RE = re.compile(r"([0-9]+)(w|d|h|m|s)")
_UNIT_SECONDS: dict[str, int] = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str | int) -> timedelta:
    """Parse ``1h30m``-style text (or the integer 0, as YAML reads a bare ``0``) to a timedelta."""
    if isinstance(text, bool):  # bool is an int subclass: `true` is not a duration
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int):
        if text != 0:
            raise ValueError(f"not a duration: {text!r} (write a unit: {text}s, {text}m, ...)")
        return timedelta(0)
    value = text.strip()
    if not DURATION_RE.match(value):
        raise ValueError(f"not a duration: {text!r} (expected e.g. 30s, 15m, 4h, 1h30m, 7d, 2w)")
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART_RE.findall(value))
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The canonical text of a duration: ``timedelta(hours=1, minutes=30)`` -> ``1h30m``."""
    total = value.total_seconds()
    if total < 0:
        return "-" + format_duration(-value)
    # Sub-second parts cannot be written in a spec; round rather than print a float.
    remaining = round(total)
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit in ("w", "d", "h", "m", "s"):
        count, remaining = divmod(remaining, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
