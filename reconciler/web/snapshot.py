"""Reading the world for the status page: the state store, fed, the running copies.

Why a snapshot made in the background: a status page is open on several screens during a
cutover weekend, each polling every two seconds, and reading 10,000 migrations, fed's
directory and making the plan takes a few hundred milliseconds on a busy machine. So the
page is served from the newest snapshot, and a request finding it older than `max_age`
(one second, or three times what the last refresh took, so that refreshing never takes more
than a third of the process) starts a refresh in a background thread instead of waiting: a page
answers in the time it takes to render, its figures at most a refresh old (the time of the
snapshot is on the page). Only the first request waits. The reads are the engine's own
(`read_migrations`, `Engine.plan`, the mover's `throughput`, the workers' jobs of
`reconciler.jobs.read`, as `reconcile status` reads them), never a second copy of their
queries.

fed is read with a short timeout and every part separately: an unreachable fed, a missing
token or an old fed without `/v1/nodes` leaves a note on the page, not an error page. The
plan then uses the last directory fed gave (or none, said so on the page).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from reconciler.engine import Engine, Observed, read_migrations
from reconciler.errors import MailferryError
from reconciler.fedclient import FedClient
from reconciler.jobs.read import read_jobs
from reconciler.jobs.view import jobs_view
from reconciler.mover.manifest import RECENT_RUNS, throughput
from reconciler.plan import MigrationView
from reconciler.state.model import Event, Migration, StationReport, TransferRun
from reconciler.state.states import MigrationState
from reconciler.web.views import (
    CopyFacts,
    EventFacts,
    FedPanel,
    MailboxDetail,
    PlacementInfo,
    ReportFacts,
    Snapshot,
    mailbox_detail,
)

log = logging.getLogger("reconciler.web")
FED_TIMEOUT = 2.0  # seconds per fed call: the page must not hang on a dead fed
MEASURE_PER_REFRESH = 25  # mailbox sizes read from the drivers per refresh (a walk each)
COPY_PHASES = (None, "prestage", "copy", "final")


class Source:
    """The page's view of one engine (a callable: `--watch` rebuilds its engine)."""

    def __init__(self, engine: Callable[[], Engine], *, max_age: float = 1.0) -> None:
        self.engine = engine
        self.max_age = max_age
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None
        self._refreshing = False
        self._cost = 0.0  # seconds the last refresh took
        self.error: str | None = None  # why the last background refresh failed
        self._directory: dict[str, str] | None = None
        self._sizes: dict[tuple[str, str], tuple[int, int] | None] = {}

    def fed_client(self) -> FedClient | None:
        """fed's control API with a short timeout, or None without a token."""
        base = self.engine().fed
        return FedClient(base.base_url, base.token, timeout=FED_TIMEOUT) if base.token else None

    def snapshot(self) -> Snapshot:
        """The newest snapshot; one older than `max_age` is refreshed in the background
        (only the very first call waits for a read)."""
        with self._lock:
            cached = self._cached
            if cached is None:
                return self.refresh()
            # Never busier than a third of the time: a refresh costing 0.5 s (10,000
            # mailboxes on a busy machine) runs at most every 1.5 s, however many poll.
            due = max(self.max_age, 3 * self._cost)
            if time.monotonic() - cached[0] >= due and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh_quietly, name="status-page-snapshot",
                                 daemon=True).start()
            return cached[1]

    def refresh(self) -> Snapshot:
        """Read a new snapshot now (and keep it)."""
        began = time.monotonic()
        snap = self._read()
        self._cached = (time.monotonic(), snap)
        self._cost = self._cached[0] - began
        return snap

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
            self.error = None
        except Exception as exc:  # the state store away for a moment: keep the last one
            log.exception("status page: snapshot not refreshed")
            self.error = f"the page could not be refreshed: {type(exc).__name__}: {exc}"
        finally:
            self._refreshing = False

    def _read(self) -> Snapshot:
        engine = self.engine()
        notes: list[str] = []
        fed = self.fed_client()
        why = f" ({engine.fed_unavailable})" if engine.fed_unavailable else ""
        panel = FedPanel(error=f"no fed token{why}: fed's panel and directory are not shown"
                         if fed is None else None)
        directory = self._directory
        if fed is not None:
            try:
                directory = fed.directory().entries
                self._directory = directory
            except MailferryError as exc:
                panel.error = str(exc)
            if panel.error is None:
                fed_panel(fed, panel)
        if directory is None:
            directory = {}
            notes.append("fed's directory could not be read: mailboxes without a migration "
                         "record are shown as the specs want them, not as they are")
        elif panel.error is not None:
            notes.append("fed is not answering: the plan uses its last directory")
        migrations = read_migrations(engine.store)
        suspended = engine.suspended()
        plan = engine.plan(observed=Observed(migrations, directory, suspended))
        latest = {m.address: m for m in migrations if not m.purged}
        with engine.store.session() as session:
            copies = copy_facts(session, {m.id for m in latest.values()})
            rates = throughput(session, RECENT_RUNS)
        self._measure(engine, latest, copies)
        for key, box in dict(engine.progress.boxes).items():
            m = latest.get(key)
            if m is None or box.finished is not None:
                continue
            copies[m.id] = CopyFacts(box.messages_total, box.bytes_total, box.done_messages,
                                     box.done_bytes, running=True)
        desired = Counter(d.placement for d in engine.desired.values())
        placements = {
            name: PlacementInfo(name, p.system, engine.specs.windows.get(p.window)
                                if p.window else None, desired[name], p.description)
            for name, p in engine.specs.placements.items()}
        return Snapshot(at=plan.at, plan=plan, migrations=latest, copies=copies, rates=rates,
                        placements=placements, fed=panel, suspended=suspended,
                        commit=engine.specs.commit, notes=notes,
                        jobs=jobs_view(read_jobs(engine.store), plan.at))

    def _measure(self, engine: Engine, latest: dict[str, MigrationView],
                 copies: dict[int, CopyFacts]) -> None:
        """Source totals of mailboxes still to copy that no pass has measured yet: from the
        driver (a walk of the mailbox), at most `MEASURE_PER_REFRESH` new ones per refresh
        and each once (old mail hardly changes before its copy)."""
        budget = MEASURE_PER_REFRESH
        for m in latest.values():
            if m.id in copies or m.state >= MigrationState.DATA_COPIED or m.failed_reason \
                    or not m.modes.copies_mail:
                continue
            key = (m.source_system, m.source_mailbox)
            if key not in self._sizes:
                if budget <= 0 or m.source_system not in engine.drivers:
                    continue
                budget -= 1
                try:
                    info = engine.drivers[m.source_system].mailbox_info(m.source_mailbox)
                    self._sizes[key] = (info.size_bytes, info.messages)
                except Exception:  # a system down or a mailbox gone: no total for it
                    self._sizes[key] = None
            size = self._sizes[key]
            if size is not None:
                copies[m.id] = CopyFacts(messages_total=size[1], bytes_total=size[0])

    def mailbox(self, address: str) -> MailboxDetail:
        """The page of one mailbox."""
        snap = self.snapshot()
        address = address.lower()
        engine = self.engine()
        m = snap.migrations.get(address)
        with engine.store.session() as session:
            hold = session.scalar(select(Migration.hold_started_at).where(
                Migration.id == m.id)) if m is not None else None
            events = [EventFacts(e.at, e.step, e.from_state, e.to_state, e.specs_commit,
                                 e.detail)
                      for e in session.scalars(select(Event).where(Event.address == address)
                                               .order_by(Event.id))]
            folders: list[dict[str, Any]] = []
            if m is not None:
                report = session.scalar(
                    select(TransferRun.report).where(TransferRun.migration_id == m.id,
                                                     TransferRun.report.is_not(None))
                    .order_by(TransferRun.id.desc()).limit(1))
                folders = _folders(report)
            reports = [ReportFacts(r.at, r.station, r.kind, r.ok,
                                   json.dumps(r.detail, sort_keys=True)[:500])
                       for r in session.scalars(select(StationReport)
                                                .where(StationReport.address == address)
                                                .order_by(StationReport.id.desc()).limit(50))]
        return mailbox_detail(address, snap, hold_started=hold, events=events,
                              folders=folders, reports=reports)


def copy_facts(session: Any, ids: set[int]) -> dict[int, CopyFacts]:
    """migration id -> the figures of its newest copy pass (one query over transfer_runs)."""
    rows = session.execute(
        select(TransferRun.migration_id, TransferRun.phase, TransferRun.copied,
               TransferRun.present, TransferRun.bytes_copied, TransferRun.messages_total,
               TransferRun.bytes_total, TransferRun.verified).order_by(TransferRun.id))
    facts: dict[int, CopyFacts] = {}
    for mid, phase, copied, present, size, messages, total, verified in rows:
        if mid in ids and phase in COPY_PHASES:
            facts[mid] = CopyFacts(messages, total, (copied or 0) + (present or 0), size or 0,
                                   bool(verified))
    return facts


def fed_panel(fed: FedClient, panel: FedPanel) -> None:
    """Fill `panel` from fed: holds, queue counts, depth per destination, nodes."""
    try:
        panel.holds = sorted(
            ({"address": a, "since": h.since, "age_s": h.age_seconds, "waiting": h.waiting,
              "covers": list(h.covers)} for a, h in fed.holds().items()),
            key=lambda h: -float(h["age_s"]))
        q = fed.queue()
        panel.queue = {"pending": q.pending, "held": q.held, "retrying": q.retrying,
                       "shunted": q.shunted}
        depth: Counter[str] = Counter()
        for message in fed.queue_messages(limit=10000):
            for rcpt in message.get("recipients", []):
                depth[str(rcpt.get("destination") or "-")] += 1
        panel.destinations = sorted(depth.items())
    except MailferryError as exc:
        panel.error = str(exc)
        return
    try:
        panel.nodes = [{"name": n.get("name"), "alive": bool(n.get("alive")),
                        "heartbeat_age": n.get("heartbeat_age")} for n in fed.nodes()]
    except MailferryError as exc:
        panel.nodes_error = str(exc)


def _folders(report: str | None) -> list[dict[str, Any]]:
    if not report:
        return []
    try:
        folders = json.loads(report).get("folders", [])
    except (ValueError, AttributeError):
        return []
    return [f for f in folders if isinstance(f, dict)]
