"""Progress of a mover run: a live display on a terminal, JSON Lines otherwise.

Why both: an admin watching a prestage of 2,000 mailboxes wants to see, on one screen, how
far each running mailbox is and when the whole run will end; a CI job, a log collector or
the reconciler itself wants machine-readable events. The same `Progress` object receives
every event from the copy tasks (all in one event loop, so no locking) and a renderer
decides what to show: `TerminalProgress` redraws a small table at most four times a second
(rates over the whole run, ETA from the remaining bytes), `JsonProgress` writes one JSON
object per event (format ``mailferry.mover/v1``, throttled per mailbox to one
``progress`` event a second), `Progress` itself stays silent.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class MailboxProgress:
    """Figures of one mailbox in this run."""

    key: str
    messages_total: int = 0
    bytes_total: int = 0
    done_messages: int = 0  # copied + already present
    done_bytes: int = 0
    copied: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    status: str = "listing"


class Progress:
    """Collects the figures; renders nothing."""

    def __init__(self) -> None:
        self.boxes: dict[str, MailboxProgress] = {}
        self.started = time.monotonic()
        self.mailboxes_total = 0

    def run_started(self, mailboxes: int) -> None:
        """The run will handle this many mailboxes."""
        self.mailboxes_total = mailboxes

    def mailbox_started(self, key: str, messages: int, size: int) -> None:
        """A mailbox was listed: its totals."""
        self.boxes[key] = MailboxProgress(key, messages, size, status="copying")
        self.emit({"event": "mailbox", "mailbox": key, "messages": messages, "bytes": size})

    def advanced(self, key: str, messages: int, size: int, copied: int = 0,
                 failed: int = 0) -> None:
        """Messages of a mailbox were handled (copied, found present or failed)."""
        box = self.boxes.get(key)
        if box is None:
            return
        box.done_messages += messages
        box.done_bytes += size
        box.copied += copied
        box.failed += failed
        self.tick(box)

    def mailbox_done(self, key: str, report: dict[str, Any]) -> None:
        """A mailbox finished (verified or not)."""
        box = self.boxes.setdefault(key, MailboxProgress(key))
        box.finished = time.monotonic()
        box.status = "verified" if report.get("verified") else "NOT VERIFIED"
        self.emit({"event": "done", "mailbox": key, **report})

    def run_done(self) -> None:
        """The whole run is over."""
        self.emit({"event": "run", **self.totals()})

    def totals(self) -> dict[str, Any]:
        """Overall figures: counts, rates and ETA."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done_m = sum(b.done_messages for b in self.boxes.values())
        done_b = sum(b.done_bytes for b in self.boxes.values())
        total_b = sum(b.bytes_total for b in self.boxes.values())
        rate_b = done_b / elapsed
        return {
            "mailboxes": self.mailboxes_total,
            "mailboxes_done": sum(1 for b in self.boxes.values() if b.finished is not None),
            "messages": sum(b.messages_total for b in self.boxes.values()),
            "messages_done": done_m, "bytes_done": done_b,
            "copied": sum(b.copied for b in self.boxes.values()),
            "failed": sum(b.failed for b in self.boxes.values()),
            "seconds": round(elapsed, 3),
            "messages_per_s": round(done_m / elapsed, 1),
            "mb_per_s": round(rate_b / 1e6, 3),
            "eta_s": round((total_b - done_b) / rate_b, 1) if rate_b > 0 else None,
        }

    def tick(self, box: MailboxProgress) -> None:
        """Called after every advance; renderers override."""

    def emit(self, event: dict[str, Any]) -> None:
        """Called on every discrete event; renderers override."""


class JsonProgress(Progress):
    """JSON Lines on a stream (format mailferry.mover/v1)."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 1.0) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self._last: dict[str, float] = {}

    def emit(self, event: dict[str, Any]) -> None:
        """Write one event."""
        record = {"format": "mailferry.mover/v1", "t": round(time.time(), 3), **event}
        self.stream.write(json.dumps(record, default=str) + "\n")
        self.stream.flush()

    def tick(self, box: MailboxProgress) -> None:
        """At most one progress event per mailbox per interval."""
        now = time.monotonic()
        if now - self._last.get(box.key, 0.0) >= self.interval:
            self._last[box.key] = now
            self.emit({"event": "progress", "mailbox": box.key,
                       "messages_done": box.done_messages, "messages": box.messages_total,
                       "bytes_done": box.done_bytes, "bytes": box.bytes_total})


class TerminalProgress(Progress):
    """A live table on a terminal: running mailboxes, then the overall line."""

    def __init__(self, stream: TextIO = sys.stderr, rows: int = 10) -> None:
        super().__init__()
        self.stream = stream
        self.rows = rows
        self._drawn = 0
        self._last = 0.0

    def tick(self, box: MailboxProgress) -> None:
        """Redraw at most four times a second."""
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            self.draw()

    def emit(self, event: dict[str, Any]) -> None:
        """Redraw on discrete events too."""
        self.draw()

    def draw(self) -> None:
        """Rewrite the table in place (ANSI: cursor up, clear line)."""
        lines: list[str] = []
        running = [b for b in self.boxes.values() if b.finished is None][: self.rows]
        for b in running:
            pct = 100.0 * b.done_bytes / b.bytes_total if b.bytes_total else 100.0
            took = max(time.monotonic() - b.started, 1e-6)
            lines.append(f"  {b.key[:40]:40} {b.done_messages:>7}/{b.messages_total:<7} "
                         f"{pct:5.1f}%  {b.done_messages / took:7.0f} msg/s")
        t = self.totals()
        eta = "-" if t["eta_s"] is None else f"{t['eta_s']:.0f}s"
        lines.append(f"mover: {t['mailboxes_done']}/{t['mailboxes']} mailboxes, "
                     f"{t['messages_done']}/{t['messages']} messages, {t['copied']} copied, "
                     f"{t['failed']} failed, {t['messages_per_s']:.0f} msg/s "
                     f"{t['mb_per_s']:.2f} MB/s, ETA {eta}")
        out = "".join("\x1b[1A\x1b[2K" for _ in range(self._drawn))
        self.stream.write(out + "\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)


def make_progress(mode: str, stream: TextIO = sys.stderr) -> Progress:
    """'auto' (terminal if a tty, else JSON), 'tty', 'json' or 'none'."""
    if mode == "auto":
        mode = "tty" if stream.isatty() else "json"
    if mode == "tty":
        return TerminalProgress(stream)
    if mode == "json":
        return JsonProgress(stream)
    return Progress()
