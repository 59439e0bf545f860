"""The agent's outbox: no station result is ever lost.

Why. A check result or a `done` report that never reaches the reconciler stalls a migration
(the engine waits for it) or, worse, makes the help desk redo work the station already did.
Workstations lose their network (VPN drops, laptops closing) exactly when users are told
"your mailbox is being moved". So a report is first written to disk -- one JSON file per report
in `<state-dir>/outbox/`, written atomically -- and only then sent; the file is deleted once
the API acknowledged it (201 stored or 200 already stored: the report_id makes resending
harmless). If the API cannot be reached the files stay and the next run sends them, oldest
first, so the reconciler sees the station's story in the order it happened.

A report the API *refuses* (4xx: malformed, not our migration) would block the queue forever
if retried; it is moved to `outbox/rejected/` and logged instead -- kept for the help desk,
never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from station_agent.client import ApiRefused, ApiUnreachable, StationApiClient
from station_agent.fsutil import atomic_write, fsync_dir

log = logging.getLogger("station_agent")


@dataclass
class FlushResult:
    """What one flush did."""

    sent: int = 0
    rejected: int = 0
    pending: int = 0
    error: str | None = None


class Outbox:
    """A directory of reports waiting to be acknowledged by the station API."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "outbox"
        self.rejected_dir = self.directory / "rejected"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_ns = 0

    def put(self, migration_id: int | None, kind: str, ok: bool,
            detail: dict[str, Any]) -> dict[str, Any]:
        """Persist a new report (before any attempt to send it) and return it."""
        report = {"report_id": str(uuid.uuid4()), "migration_id": migration_id, "kind": kind,
                  "ok": ok, "detail": detail}
        # A strictly increasing nanosecond prefix keeps the send order = the order of events,
        # even for two reports written within the same clock tick.
        stamp = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = stamp
        path = self.directory / f"{stamp:020d}-{report['report_id']}.json"
        atomic_write(path, json.dumps(report, sort_keys=True).encode("utf-8"))
        return report

    def pending(self) -> list[Path]:
        """Reports not yet acknowledged, oldest first."""
        return sorted(p for p in self.directory.glob("*.json") if p.is_file())

    def flush(self, client: StationApiClient) -> FlushResult:
        """Send pending reports in order; stop at the first one the API cannot take now."""
        result = FlushResult()
        files = self.pending()
        for index, path in enumerate(files):
            try:
                report = json.loads(path.read_bytes())
            except (OSError, json.JSONDecodeError) as exc:
                # Cannot happen with atomic writes, but a damaged file must not block the rest.
                log.error("outbox file %s unreadable (%s): moved to %s", path.name, exc,
                          self.rejected_dir)
                self._reject(path)
                result.rejected += 1
                continue
            try:
                client.post_report(report)
            except ApiUnreachable as exc:
                result.pending = len(files) - index
                result.error = str(exc)
                log.warning("reconciler unreachable, %d report(s) kept in %s for the next run: "
                            "%s", result.pending, self.directory, exc)
                return result
            except ApiRefused as exc:
                log.error("reconciler refused report %s (%s %s): %s; kept in %s",
                          report.get("report_id"), report.get("kind"),
                          "ok" if report.get("ok") else "not ok", exc.message, self.rejected_dir)
                self._reject(path)
                result.rejected += 1
                continue
            path.unlink()
            fsync_dir(self.directory)
            result.sent += 1
            log.debug("report %s (%s) delivered", report.get("report_id"), report.get("kind"))
        return result

    def _reject(self, path: Path) -> None:
        self.rejected_dir.mkdir(exist_ok=True)
        os.replace(path, self.rejected_dir / path.name)
        fsync_dir(self.directory)
