"""The wave report: when a placement finishes, what happened to it, in a file and by mail.

Why: a migration wave is a change an organisation signs off. After Friday night the people
who approved it want one page: how many mailboxes moved, how much mail waited in fed's holds
and was released to the new mailboxes, how much old mail was copied, what failed and why.
The event history has all of it, but scattered over thousands of rows; the report adds it
up once, when the wave is done, so nobody has to write SQL on Monday morning.

When is a placement *finished*: it has migrations on record, none of them is in progress
(each reached 13, or 10 where its modes stop there, or failed), and no mailbox of the
placement has a pending step. Failures are part of a finished wave (they wait for an admin;
the report lists them). Each report is recorded in `wave_reports` with the newest migration
id it covers, so it is written once; a mailbox added to the placement later makes a new
report when that one is done too.

Files: `<reports dir>/wave-<placement>-<UTC time>.txt` (for people), `.html` (the same
figures with three charts drawn as inline SVG on the server: mean time per step, held time
per mailbox, copy rate per mailbox; one self-contained file, no script, opens anywhere) and
`.json` (for tools).
Mail: when the placement has `reportTo`, the text goes through fed's SMTP port like any
mail, from `mailferry@<fed's first domain>`; a failure to send is said and recorded, never
fatal (the file is there).
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from reconciler.engine import Engine
from reconciler.humanize import human_bytes
from reconciler.plan import Plan
from reconciler.state.model import Event, Migration, TransferRun, WaveReport
from reconciler.state.states import MigrationState


@dataclass
class WaveSummary:
    """The figures of one finished placement."""

    placement: str
    target: str
    mailboxes: int = 0
    moved: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    held_and_released: int = 0
    messages_copied: int = 0
    bytes_copied: int = 0
    source_deleted: int = 0
    started: str | None = None
    finished: str | None = None
    longest_hold_s: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)  # step -> mean seconds
    held_seconds: dict[str, float] = field(default_factory=dict)  # address -> held
    copy_rates: dict[str, float] = field(default_factory=dict)  # address -> messages/s

    def text(self) -> str:
        lines = [
            f"mailferry wave report: placement {self.placement} (to {self.target})",
            f"  started:                          {self.started}",
            f"  finished:                         {self.finished}",
            f"  mailboxes in the wave:            {self.mailboxes}",
            f"  mailboxes moved:                  {self.moved}",
            f"  old mailboxes deleted (E41):      {self.source_deleted}",
            f"  messages held and released (E9):  {self.held_and_released}",
            f"  longest hold:                     {self.longest_hold_s:.1f} s",
            f"  old messages copied:              {self.messages_copied}",
            f"  data copied:                      {human_bytes(self.bytes_copied)}",
            f"  failures:                         {len(self.failed)}",
        ]
        lines += [f"    {f['address']} at {f['step']}: {f['reason']}" for f in self.failed]
        return "\n".join(lines) + "\n"


    def html(self) -> str:
        """The report as one HTML page with its charts as inline SVG (escaped values)."""
        from reconciler.web.templating import templates  # jinja2: +0.05 s to every start

        return templates().get_template("report.html").render(r=self)


def _finished(m: Migration, refused: set[str]) -> bool:
    """Failed, at 13, or at 10 where it stops (modes, or a deletion refused for consent)."""
    return m.failed or m.state == MigrationState.SOURCE_DELETED or (
        m.state == MigrationState.DONE and (m.modes.ends_at_10 or m.address in refused))


def finished_placements(engine: Engine, plan: Plan) -> dict[str, list[Migration]]:
    """placement -> its migrations, for every placement that is finished now."""
    busy = {c.placement for c in plan.changes
            if c.action not in ("in-sync", "failed", "refused", "conflict", "orphan")}
    refused = {c.address for c in plan.changes if c.action == "refused"}
    latest: dict[str, Migration] = {}
    with engine.store.session() as session:
        for m in session.scalars(select(Migration).order_by(Migration.id)):
            latest[m.address] = m
    result: dict[str, list[Migration]] = {}
    for name in engine.specs.placements:
        if name in busy:
            continue
        rows = [m for m in latest.values() if m.placement == name]
        if rows and all(_finished(m, refused) for m in rows):
            result[name] = rows
    return result


def summarise(engine: Engine, placement: str, rows: list[Migration]) -> WaveSummary:
    """Add up the events and transfer runs of one placement's migrations."""
    ids = [m.id for m in rows]
    summary = WaveSummary(placement=placement, target=rows[-1].target_system,
                          mailboxes=len(rows))
    with engine.store.session() as session:
        events = session.scalars(select(Event).where(Event.migration_id.in_(ids))
                                 .order_by(Event.id)).all()
        copied = session.execute(
            select(func.coalesce(func.sum(TransferRun.copied), 0),
                   func.coalesce(func.sum(TransferRun.bytes_copied), 0))
            .where(TransferRun.migration_id.in_(ids))).one()
    summary.messages_copied, summary.bytes_copied = int(copied[0]), int(copied[1])
    hold_start = {m.id: m.hold_started_at for m in rows}
    address = {m.id: m.address for m in rows}
    previous: dict[int, datetime] = {}
    step_times: dict[str, list[float]] = {}
    for e in events:
        detail = _detail(e.detail)
        mid = e.migration_id or 0
        if e.to_state is not None and mid in previous:
            step_times.setdefault(e.step, []).append((e.at - previous[mid]).total_seconds())
        if e.to_state is not None:
            previous[mid] = e.at
        if e.step == "E9":
            summary.held_and_released += int(detail.get("released_messages", 0) or 0)
            since = hold_start.get(mid)
            if since is not None:
                held = (e.at - since).total_seconds()
                summary.longest_hold_s = max(summary.longest_hold_s, held)
                summary.held_seconds[address[mid]] = round(held, 3)
        elif e.step == "E41-E42":
            summary.source_deleted += 1
    summary.step_seconds = {step: round(sum(times) / len(times), 3)
                            for step, times in step_times.items()}
    with engine.store.session() as session:
        for mid, messages, seconds in session.execute(
                select(TransferRun.migration_id, func.sum(TransferRun.copied),
                       func.sum(TransferRun.seconds))
                .where(TransferRun.migration_id.in_(ids), TransferRun.copied > 0)
                .group_by(TransferRun.migration_id)):
            if seconds:
                summary.copy_rates[address[mid]] = round(float(messages) / float(seconds), 1)
    if events:
        summary.started = _iso(events[0].at)
        summary.finished = _iso(events[-1].at)
    for m in rows:
        if m.failed:
            summary.failed.append({"address": m.address, "step": m.failed_step or "-",
                                   "reason": m.failed_reason or ""})
        elif m.state >= MigrationState.DONE:
            summary.moved += 1
    return summary


def write_finished(engine: Engine, plan: Plan, reports_dir: str | Path,
                   notice: Callable[[str], None]) -> list[Path]:
    """Write (and mail) the report of every placement finished since its last report."""
    written: list[Path] = []
    for name, rows in finished_placements(engine, plan).items():
        newest = max(m.id for m in rows)
        with engine.store.session() as session:
            done = session.scalars(select(WaveReport.id).where(
                WaveReport.placement == name, WaveReport.last_migration_id == newest)).first()
        if done is not None:
            continue
        summary = summarise(engine, name, rows)
        folder = Path(reports_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = f"{engine.clock():%Y%m%dT%H%M%SZ}"
        path = folder / f"wave-{name}-{stamp}.txt"
        path.write_text(summary.text(), encoding="utf-8")
        path.with_suffix(".json").write_text(json.dumps(asdict(summary), indent=1) + "\n",
                                             encoding="utf-8")
        path.with_suffix(".html").write_text(summary.html(), encoding="utf-8")
        recipients = engine.specs.placements[name].report_to
        mailed = _mail(engine, summary, recipients, notice) if recipients else ""
        with engine.store.session() as session:
            session.add(WaveReport(placement=name, last_migration_id=newest, path=str(path),
                                   mailed_to=mailed, at=engine.clock()))
        notice(f"wave report for placement {name}: {path}"
               + (f" (mailed to {mailed})" if mailed else ""))
        written.append(path)
    return written


def _mail(engine: Engine, summary: WaveSummary, recipients: tuple[str, ...],
          notice: Callable[[str], None]) -> str:
    """Send the report through fed; the recipients on success, '' on failure (said)."""
    fed = engine.specs.fed
    sender = f"mailferry@{fed.domains[0]}" if fed.domains else "mailferry@localhost"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = f"mailferry: wave {summary.placement} finished ({summary.moved} moved, " \
                     f"{len(summary.failed)} failed)"
    msg.set_content(summary.text())
    try:
        with smtplib.SMTP(fed.smtp.host, fed.smtp.port, timeout=30) as smtp:
            smtp.send_message(msg, sender, list(recipients))
    except (OSError, smtplib.SMTPException) as exc:
        notice(f"wave report for {summary.placement} not mailed: {exc}")
        return ""
    return ", ".join(recipients)


def _detail(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")
