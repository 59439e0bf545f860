"""Progress of a mover run: a live display on a terminal, JSON Lines otherwise.

Why several: an admin watching a prestage of 2,000 mailboxes wants to see, on one screen, how
far each running mailbox is and when the whole run will end; a log wants a line per mailbox;
a CI job, a log collector or the reconciler itself wants machine-readable events. The same
`Progress` object receives every event from the copy tasks (all in one event loop) and a
renderer decides what to show: `TerminalProgress` draws live bars with rich (one per running
mailbox and one for the run, with rates and ETA, four refreshes a second), `PlainProgress`
writes a line per finished mailbox and the run's figures every ten seconds (the default off a
terminal), `JsonProgress` writes one JSON object per event (format ``mailferry.mover/v1``,
throttled per mailbox to one ``progress`` event a second), `Progress` itself stays silent:
the reconciler's engine keeps one, read by the status page of the same process.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from reconciler.humanize import human_bytes, human_duration


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


def figures(done_bytes: int, total_bytes: int, seconds: float) -> str:
    """'1.2 MB of 3.4 MB, 0.8 MB/s, ETA 3s' (the rate since the start, the ETA from it)."""
    rate = done_bytes / seconds if seconds > 0 else 0.0
    left = max(total_bytes - done_bytes, 0)
    eta = human_duration(left / rate) if rate > 0 and left else ("-" if left else "0s")
    return (f"{human_bytes(done_bytes)} of {human_bytes(total_bytes)}, "
            f"{human_bytes(rate)}/s, ETA {eta}")


class TerminalProgress(Progress):
    """Live bars on a terminal (rich): one per running mailbox, and the whole run's."""

    MAX_ROWS = 10  # running mailboxes shown at once; finished ones leave a line above

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        super().__init__()
        # rich: +0.04 s to every start, and only a terminal shows bars.
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn
        from rich.progress import Progress as Bars

        self.console = Console(file=stream, highlight=False)
        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                         TextColumn("{task.fields[figures]}"), console=self.console,
                         refresh_per_second=4, redirect_stdout=True, redirect_stderr=False)
        self._tasks: dict[str, Any] = {}
        self._overall: Any = None
        self._running = False

    def show(self) -> None:
        """Put the bars on the screen (idempotent)."""
        if not self._running:
            self.bars.start()
            self._running = True

    def start(self, title: str = "mover") -> None:
        """Show the bars with the overall one, titled `title` (idempotent)."""
        self.show()
        if self._overall is None:
            self._overall = self.bars.add_task(title, total=None, figures="")

    def stop(self) -> None:
        """Take the bars off the screen (idempotent)."""
        if self._running:
            self.bars.stop()
            self._running = False

    def run_started(self, mailboxes: int) -> None:
        super().run_started(mailboxes)
        self.start()

    def mailbox_started(self, key: str, messages: int, size: int) -> None:
        super().mailbox_started(key, messages, size)
        self.start()
        if len(self._tasks) < self.MAX_ROWS:
            self._tasks[key] = self.bars.add_task(f"  {key[:40]}", total=size or None,
                                                  figures="")

    def tick(self, box: MailboxProgress) -> None:
        task = self._tasks.get(box.key)
        if task is not None:
            self.bars.update(task, completed=box.done_bytes, figures=figures(
                box.done_bytes, box.bytes_total, time.monotonic() - box.started)
                + f", {box.done_messages}/{box.messages_total} messages")
        self._update_overall()

    def mailbox_done(self, key: str, report: dict[str, Any]) -> None:
        super().mailbox_done(key, report)
        task = self._tasks.pop(key, None)
        if task is not None:
            self.bars.remove_task(task)
        box = self.boxes[key]
        self.console.print(f"{key}: {box.status}, {report.get('copied', 0)} copied, "
                           f"{report.get('present', 0)} present, {report.get('failed', 0)} "
                           f"failed in {(box.finished or box.started) - box.started:.1f} s")
        self._update_overall()

    def run_done(self) -> None:
        super().run_done()
        self._update_overall()
        t = self.totals()
        self.stop()
        self.console.print(totals_line(t))

    def _update_overall(self) -> None:
        if self._overall is None:
            return
        t = self.totals()
        total = sum(b.bytes_total for b in self.boxes.values())
        self.bars.update(self._overall, total=total or None, completed=t["bytes_done"],
                         figures=f"{t['mailboxes_done']}/{t['mailboxes']} mailboxes, "
                         + figures(t["bytes_done"], total, t["seconds"]))


def totals_line(t: dict[str, Any]) -> str:
    """The run's figures on one line."""
    eta = "-" if t["eta_s"] is None else f"{t['eta_s']:.0f}s"
    return (f"mover: {t['mailboxes_done']}/{t['mailboxes']} mailboxes, "
            f"{t['messages_done']}/{t['messages']} messages, {t['copied']} copied, "
            f"{t['failed']} failed, {t['messages_per_s']:.0f} msg/s "
            f"{t['mb_per_s']:.2f} MB/s, ETA {eta}")


class PlainProgress(Progress):
    """Plain lines for a log (not a terminal): one per mailbox finished, and the run's
    figures at most every `interval` seconds while it goes on."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 10.0) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self._last = time.monotonic()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def tick(self, box: MailboxProgress) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line(totals_line(self.totals()))

    def mailbox_done(self, key: str, report: dict[str, Any]) -> None:
        super().mailbox_done(key, report)
        self._line(f"{key}: {self.boxes[key].status}, {report.get('copied', 0)} copied, "
                   f"{report.get('present', 0)} present, {report.get('failed', 0)} failed")

    def run_done(self) -> None:
        super().run_done()
        self._line(totals_line(self.totals()))


def make_progress(mode: str, stream: TextIO = sys.stderr) -> Progress:
    """'auto' (bars on a terminal, else plain lines), 'tty', 'plain', 'json' or 'none'."""
    if mode == "auto":
        mode = "tty" if stream.isatty() else "plain"
    if mode == "tty":
        return TerminalProgress(stream)
    if mode == "plain":
        return PlainProgress(stream)
    if mode == "json":
        return JsonProgress(stream)
    return Progress()
