"""`reconcile --watch`: apply continuously, waking exactly when there is something to do.

Why not a loop with a sleep: a fixed interval is either too slow (a window opening at 20:00
should see its first step at 20:00, not at 20:04) or too busy (a plan over 100,000
mailboxes every few seconds for nothing). So the loop sleeps until the first of:

- **a spec change**: watchdog tells us a spec file of the folder changed; editors fire
  several events per save (write a temporary file, rename, chmod), so events are gathered
  until the folder has been quiet for `DEBOUNCE` seconds (at most `DEBOUNCE_MAX` after the
  first one) and then trigger *one* reload and pass. Invalid specs are reported and the last
  good ones kept; specs with uncommitted changes are refused unless `--allow-dirty` (the
  watcher then keeps checking git, and picks them up as soon as they are committed);
- **the next due instant** of the plan (`Plan.next_due`: a window opening, a station
  recheck, a delete delay, a retry after an error), capped by `--interval`;
- **an event** from fed (its directory version changed) or from a station (a new report in
  the state store): polled cheaply every `POLL` seconds.

Errors (fed or the state store unreachable) back off: 1 s, 2 s, 4 s ... up to
`MAX_BACKOFF`; the first success resets the delay.

One reconciler acts at a time: the watcher takes the lease (`lease.py`) before its first
pass, waiting (and saying who holds it) for as long as it takes, renews it while it works,
and if it ever loses it (it stalled past the TTL and someone took over) stops acting and
waits for it again.

SIGTERM and SIGINT finish the step in progress (the engine checks between two steps), give
the lease back and exit 0: a systemd stop or a Kubernetes rollout never cuts a step short.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mailferry.mail.backoff import backoff
from mailferry.service import notify_ready
from mailferry.signals import SignalEvents
from reconciler.engine import Engine
from reconciler.errors import MailferryError, SpecError
from reconciler.lease import Lease, LeaseHeld, LeaseInfo
from reconciler.liveprogress import for_output
from reconciler.run import Applier, Output, dirty_refusal
from reconciler.spec.gitinfo import git_state
from reconciler.spec.loader import SPEC_SUFFIXES, load_specs
from reconciler.state.model import StationReport

DEBOUNCE = 0.25  # quiet time after the last file event before reloading
DEBOUNCE_MAX = 1.0  # reload at most this long after the first event of a burst
POLL = 1.0  # how often fed and the station reports are looked at while sleeping
MAX_BACKOFF = 300.0
CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})  # watchdog types


@dataclass
class WatchOptions:
    """What `reconcile --watch` was asked."""

    specs_dir: str
    state_url: str
    interval: float = 60.0  # longest sleep without any reason to wake
    allow_dirty: bool = False
    reports_dir: str = "var/reports"
    lease_ttl: float = 30.0
    station_api: str | None = None
    web: str | None = None  # serve the status page here (HOST:PORT)
    web_token_file: str | None = None


class Watcher:
    """The watch loop around one engine (rebuilt on every good spec change)."""

    def __init__(self, engine: Engine, options: WatchOptions, out: Output,
                 build: Any) -> None:
        self.engine = engine
        self.options = options
        self.out = out
        self.build = build  # (SpecSet, state url) -> Engine
        self.applier = Applier(out, options.reports_dir, bars=for_output(out.as_json))
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.first_event: float | None = None
        self.last_event: float | None = None
        self.waiting_for_commit = False
        self.lease = Lease(engine.store, ttl=options.lease_ttl)
        self.errors = 0
        self._signature: tuple[object, ...] | None = None

    # -- signals and file events ----------------------------------------------------------
    def terminate(self, *_args: object) -> None:
        """Finish the current step, then leave (what SIGTERM/SIGINT do, through a helper
        thread: mailferry/signals.py)."""
        self.stop.set()
        self.wake.set()

    def file_event(self, paths: list[str]) -> None:
        """A watchdog event: note it if it touches a spec file."""
        if not any(Path(p).suffix in SPEC_SUFFIXES and not Path(p).name.startswith(".")
                   for p in paths if p):
            return
        now = time.monotonic()
        self.first_event = self.first_event or now
        self.last_event = now
        self.wake.set()

    def _edit_settled(self) -> bool:
        """True when a burst of file events is over (quiet, or long enough)."""
        if self.first_event is None or self.last_event is None:
            return False
        now = time.monotonic()
        return now - self.last_event >= DEBOUNCE or now - self.first_event >= DEBOUNCE_MAX

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until SIGTERM; the exit code."""
        watcher = self

        class Changed(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in CHANGES:  # opened/closed-no-write: our own reads
                    return
                watcher.file_event([str(event.src_path),
                                    str(getattr(event, "dest_path", "") or "")])

        # Not signal.signal(..., self.terminate): setting an Event in a handler can deadlock
        # (mailferry/signals.py); a helper thread sets them.
        signals = SignalEvents(self.stop, self.wake)
        api = self._start_api()
        page = self._start_web()
        observer = Observer()
        observer.schedule(Changed(), self.options.specs_dir, recursive=False)
        observer.start()
        # Ready once the specs are watched and the station API listens (Type=notify); the
        # first pass may take long and is not part of starting.
        notify_ready(f"watching {self.options.specs_dir}")
        try:
            self.out.version("watch", self.engine)
            while not self.stop.is_set():
                if not self._hold_lease():
                    break
                self._reload_if_edited()
                delay = self._pass()
                self._sleep(delay)
        finally:
            observer.stop()
            observer.join()
            if api is not None:
                api.stop()
            if page is not None:
                page.stop()
            self.lease.release()
            signals.restore()
        self.out.notice("watch: stopped")
        return 0

    def _start_api(self) -> Any:
        if not self.options.station_api:
            return None
        from reconciler.api.wiring import station_api_for  # aiohttp: +0.15 s to every start

        host, _, port = self.options.station_api.rpartition(":")
        api = station_api_for(lambda: self.engine, host=host or "127.0.0.1",
                              port=int(port)).start()
        self.out.notice(f"station API on {api.url}")
        return api

    def _start_web(self) -> Any:
        if not self.options.web:
            return None
        from reconciler.web.server import status_page_for  # aiohttp, jinja2: +0.2 s to every start

        page = status_page_for(lambda: self.engine, self.options.web,
                               token_file=self.options.web_token_file).start()
        self.out.notice(f"status page on {page.url}")
        return page

    def _hold_lease(self) -> bool:
        """Make sure we hold the lease (wait for it); False when asked to stop meanwhile."""
        if self.lease.holds():
            return True

        def waiting(info: LeaseInfo) -> None:
            self.out.notice(f"watch: waiting for the lease held by "
                            f"{info.describe(self.engine.clock())}")

        try:
            self.lease.acquire(timeout=None, on_wait=waiting, stop=self.stop)
        except LeaseHeld:
            return False
        if self.lease.took_over is not None:
            self.out.notice(f"watch: took over the stale lease of {self.lease.took_over.holder}")
            self.lease.took_over = None
        self.out.notice(f"watch: lease taken by {self.lease.holder}")
        self.engine.should_stop = self._should_stop
        return True

    def _should_stop(self) -> bool:
        return self.stop.is_set() or self.lease.lost.is_set()

    def _reload_if_edited(self) -> None:
        """One reload per burst of edits (or per commit of refused dirty specs)."""
        if self.first_event is None:
            return
        self.first_event = self.last_event = None
        try:
            specs = load_specs(self.options.specs_dir, long_lived=True)  # the old ones go
        except SpecError as exc:
            for problem in exc.problems:
                self.out.notice(problem)
            self.out.notice("watch: specs invalid; keeping the last good specs")
            return
        refusal = dirty_refusal(specs, self.options.allow_dirty)
        if refusal:
            if not self.waiting_for_commit:
                self.out.notice(f"watch: {refusal}; keeping the last committed specs")
            self.waiting_for_commit = True
            return
        self.waiting_for_commit = False
        engine = self.build(specs, self.options.state_url)
        engine.should_stop = self._should_stop
        engine.jobs = self.engine.jobs  # the workers' queue outlives a reload
        self.engine = engine
        self.out.notice(f"watch: specs reloaded (commit {(specs.commit or 'none')[:10]})")

    def _pass(self) -> float:
        """One apply (with output); the seconds to sleep before the next one."""
        self.engine.fed.fence = self.lease.fence  # this engine may be a reloaded one
        try:
            _, plan = self.applier.apply(self.engine, quiet_when_idle=True)
        except MailferryError as exc:
            self.errors += 1
            delay = backoff(self.errors, 1.0, MAX_BACKOFF, jitter=False)
            self.out.notice(f"error: {exc} (retry in {delay:.0f} s)")
            return delay
        self.errors = 0
        if self.engine.lease_lost is not None:  # fed fenced us out: someone took over
            self.out.notice(f"watch: {self.engine.lease_lost}")
            self.engine.lease_lost = None
            self.lease.lost.set()
        if self.lease.lost.is_set():
            self.out.notice("watch: the lease was lost (stalled past its TTL); waiting for it")
            return 0.0
        self._event_arrived()  # our own pass changed fed's version: that is the new baseline
        return self._until(plan.next_due())

    def _until(self, due: datetime | None) -> float:
        """Seconds until `due` (a little after, so that it is due), capped by --interval."""
        cap = self.options.interval
        if due is None:
            return cap
        return max(0.0, min(cap, (due - self.engine.clock()).total_seconds() + 0.05))

    def _sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking early on a settled edit, an event or SIGTERM."""
        deadline = time.monotonic() + seconds
        next_poll = time.monotonic() + POLL
        while not self.stop.is_set():
            now = time.monotonic()
            if self.first_event is not None:
                if self._edit_settled():
                    return
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            if now >= deadline:
                return
            if now >= next_poll:
                next_poll = now + POLL
                if self._event_arrived():
                    return
            self.wake.wait(max(0.0, min(deadline, next_poll) - now))
            self.wake.clear()

    def _event_arrived(self) -> bool:
        """True when fed's directory or the station reports changed, or dirty specs were
        committed (cheap: one HTTP call, one indexed query, git only while waiting)."""
        if self.waiting_for_commit:
            _, dirty = git_state(self.options.specs_dir)
            if not dirty:  # committed at last: reload as after an edit
                self.first_event = self.last_event = time.monotonic() - DEBOUNCE_MAX
                return True
        try:
            version = self.engine.fed.health().get("version")
            with self.engine.store.session() as session:
                reports = session.scalar(select(func.max(StationReport.id)))
        except MailferryError:
            return False
        except Exception:  # the store briefly locked or gone: the next poll will tell
            return False
        signature = (version, reports)
        changed = self._signature is not None and signature != self._signature
        self._signature = signature
        return changed
