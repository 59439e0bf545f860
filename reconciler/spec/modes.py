"""The modes of a migration: its policy as recorded at E1, parsed once into typed fields.

Why recorded and not read from the specs each time: a policy edited mid-migration must not
change a migration already under way (DESIGN.md, E1 records the modes). The state store keeps
them as the JSON object `to_json()` writes (the `migrations.modes` column, no schema change);
`from_json()` reads any row ever written: a key missing from an old row takes the default
below (what the code read for a missing key before the modes were typed), and a key this
version does not know is ignored, so an older or newer row never stops the reconciler.

PURE: no I/O (the plan reads these).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, Literal, cast

DataTransfer = Literal["none", "copy", "validate-and-copy", "diary-only"]
DATA_TRANSFERS: frozenset[str] = frozenset({"none", "copy", "validate-and-copy", "diary-only"})
# The transfers that copy old mail (E11 -> E15); "diary-only" copies the diary data only.
COPYING: tuple[DataTransfer, ...] = ("copy", "validate-and-copy")


@dataclass(frozen=True, slots=True)
class Modes:
    """What a migration was recorded with (the policy's spec, and the policy's name).

    The defaults are those of a key missing from a stored row; the policy's own defaults
    (`PolicySpec`) are written out in full by every E1, so they apply to new migrations."""

    policy: str = ""
    station_checks: bool = False
    data_transfer: DataTransfer = "copy"
    diary: bool = True
    local_station_data: bool = False
    delete_source_after: timedelta | None = None  # None: never delete (the migration ends at 10)
    prestage_lead: timedelta = timedelta(0)
    recheck_lead: timedelta = timedelta(0)
    retention: timedelta = timedelta(0)
    station_retries: int = 3
    folder_map: tuple[tuple[str, str], ...] = ()  # (from, to) rules of the data mover
    throttle_messages_per_second: float = 0.0  # 0: unlimited
    throttle_bytes_per_second: float = 0.0
    prestage_copy: bool = False
    verify: Literal["fast", "deep"] = "fast"
    accept_store_rewrites: tuple[tuple[str, str], ...] = ()  # (target system, rewrite)
    max_parallel: int = 10
    # (system, connections, connections per user, bytes per day); 0: no limit
    system_limits: tuple[tuple[str, int, int, int], ...] = ()

    def limits_of(self, system: str) -> tuple[int, int, int]:
        """(connections, connections per user, bytes per day) of a system; 0: no limit."""
        return next(((c, u, b) for s, c, u, b in self.system_limits if s == system), (0, 0, 0))

    @property
    def diary_only(self) -> bool:
        """Only the diary data moves; the address never does (1 -> 7 -> 8 -> 10, and stop)."""
        return self.data_transfer == "diary-only"

    @property
    def copies_mail(self) -> bool:
        """The old mail is copied by the data mover (E11 -> E15)."""
        return self.data_transfer in COPYING

    @property
    def ends_at_10(self) -> bool:
        """The migration stops at 10: delete never, or diary only (no old mailbox to go)."""
        return self.delete_source_after is None or self.diary_only

    def accepted_rewrites(self, system: str) -> frozenset[str]:
        """The store rewrites accepted for a target system, as recorded."""
        return frozenset(r for s, r in self.accept_store_rewrites if s == system)

    def to_json(self) -> dict[str, Any]:
        """The stored form: the keys and order E1 has always written."""
        return {
            "policy": self.policy,
            "stationChecks": self.station_checks,
            "dataTransfer": self.data_transfer,
            "diary": self.diary,
            "localStationData": self.local_station_data,
            "deleteSourceAfter": (None if self.delete_source_after is None
                                  else self.delete_source_after.total_seconds()),
            "prestageLead": self.prestage_lead.total_seconds(),
            "recheckLead": self.recheck_lead.total_seconds(),
            "retention": self.retention.total_seconds(),
            "stationRetries": self.station_retries,
            "folderMap": [{"from": a, "to": b} for a, b in self.folder_map],
            "throttle": {"messagesPerSecond": self.throttle_messages_per_second,
                         "bytesPerSecond": self.throttle_bytes_per_second},
            "prestageCopy": self.prestage_copy,
            "verify": self.verify,
            "acceptStoreRewrites": [{"system": s, "rewrite": r}
                                    for s, r in self.accept_store_rewrites],
            "maxParallel": self.max_parallel,
            **({"systemLimits": [{"system": s, "connections": c, "connectionsPerUser": u,
                                  "bytesPerDay": b} for s, c, u, b in self.system_limits]}
               if self.system_limits else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Modes:
        """The modes of a stored row (see the module's docstring for old and new rows)."""
        d = data if isinstance(data, Mapping) else {}
        default = _DEFAULT
        transfer = d.get("dataTransfer", default.data_transfer)
        throttle = d.get("throttle")
        throttle = throttle if isinstance(throttle, Mapping) else {}
        return cls(
            policy=str(d.get("policy", default.policy)),
            station_checks=bool(d.get("stationChecks", default.station_checks)),
            data_transfer=cast(DataTransfer, transfer if transfer in DATA_TRANSFERS
                               else default.data_transfer),
            diary=bool(d.get("diary", default.diary)),
            local_station_data=bool(d.get("localStationData", default.local_station_data)),
            delete_source_after=_seconds(d.get("deleteSourceAfter")),
            prestage_lead=_seconds(d.get("prestageLead")) or default.prestage_lead,
            recheck_lead=_seconds(d.get("recheckLead")) or default.recheck_lead,
            retention=_seconds(d.get("retention")) or default.retention,
            station_retries=int(d.get("stationRetries", default.station_retries)),
            folder_map=_pairs(d.get("folderMap"), "from", "to"),
            throttle_messages_per_second=float(throttle.get("messagesPerSecond") or 0),
            throttle_bytes_per_second=float(throttle.get("bytesPerSecond") or 0),
            prestage_copy=bool(d.get("prestageCopy", default.prestage_copy)),
            verify="deep" if d.get("verify") == "deep" else "fast",
            accept_store_rewrites=_pairs(d.get("acceptStoreRewrites"), "system", "rewrite"),
            max_parallel=int(d.get("maxParallel", default.max_parallel)),
            system_limits=_limits(d.get("systemLimits")),
        )


_DEFAULT = Modes()


@lru_cache(maxsize=256)
def modes_from_text(text: str | None) -> Modes:
    """The modes of a stored row given as its JSON text, parsed once per distinct text.

    A plan reads 100,000 rows recorded by a handful of policies: one `Modes` per policy
    version, shared by its rows (they are frozen), instead of one dict tree per row."""
    if not text:
        return _DEFAULT
    try:
        data = json.loads(text)
    except ValueError:
        return _DEFAULT
    return Modes.from_json(data)


def _seconds(value: object) -> timedelta | None:
    """A duration stored as seconds; None when not stored (JSON null, or no key)."""
    return None if value is None else timedelta(seconds=float(cast(float, value)))


def _limits(rules: object) -> tuple[tuple[str, int, int, int], ...]:
    """The stored `systemLimits` (entries without a system are skipped)."""
    if not isinstance(rules, list):
        return ()
    return tuple((str(r["system"]), int(r.get("connections") or 0),
                  int(r.get("connectionsPerUser") or 0), int(r.get("bytesPerDay") or 0))
                 for r in rules if isinstance(r, Mapping) and "system" in r)


def _pairs(rules: object, first: str, second: str) -> tuple[tuple[str, str], ...]:
    """(a, b) of a list of {first: a, second: b}; entries missing either are skipped."""
    if not isinstance(rules, list):
        return ()
    return tuple((str(r[first]), str(r[second])) for r in rules
                 if isinstance(r, Mapping) and first in r and second in r)
