"""`reconcile demo`: twenty mailboxes move from s1 to s2 while mail keeps arriving.

What it does, all on 127.0.0.1 with real processes and sockets:

1. copies `examples/quickstart` into a work folder (a git repository), gives every server a
   free port, places the twenty mailboxes on `s1` and commits;
2. starts fed, s1 and s2 (`reconciler.embedded`), applies: the mailboxes are created on s1;
3. fills them with old mail (three folders, flags, old dates) and a calendar;
4. starts a sender that mails the addresses and their aliases through fed, at a steady rate,
   remembering every Message-ID fed acknowledged with 250;
5. moves the placement to `s2`, commits, and reconciles until every migration reaches state
   13 (old mailbox deleted);
6. lets the sender run on a little, waits until fed's queue is empty, and then counts — in
   the mailboxes themselves, not from what it expected — where every message ended up.

The report's last two lines are `lost: N` and `duplicated: N`; both must be 0, and so must
the deliveries to an old mailbox after its hold began (read from s1's delivery journal).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import smtplib
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from maildir_system.store import Store as SystemStore
from mailferry.ports import free_port
from mailferry.resources import quickstart_dir
from reconciler.build import build_engine
from reconciler.drivers.base import MailSystemDriver, mailbox_id_for
from reconciler.embedded import start_embedded
from reconciler.errors import MailferryError
from reconciler.spec.loader import load_specs
from reconciler.state.model import Migration

DEADLINE_S = 50.0  # the whole migration phase; the demo must finish in under a minute


def _git(cwd: Path, *args: str) -> None:
    if shutil.which("git") is None:
        return
    subprocess.run(["git", "-c", "user.name=mailferry demo",
                    "-c", "user.email=demo@corp.example", *args],
                   cwd=cwd, check=True, capture_output=True, timeout=30)


def write_specs(specs_dir: Path, system: str, mailboxes: int) -> None:
    """The quickstart specs with free ports, `mailboxes` users, all placed on `system`."""
    specs_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted(quickstart_dir().glob("*.yaml")):
        target = specs_dir / source.name
        if target.exists() and source.name != "placement.yaml":
            continue  # ports chosen once, kept for the second commit
        docs = list(yaml.safe_load_all(source.read_text(encoding="utf-8")))
        for doc in docs:
            spec = doc["spec"]
            if doc["kind"] == "MailSystem":
                spec["maildir"]["lmtp"] = f"127.0.0.1:{free_port()}"
                spec["maildir"]["submission"] = f"127.0.0.1:{free_port()}"
            elif doc["kind"] == "FedHub":
                spec["smtp"] = f"127.0.0.1:{free_port()}"
                spec["control"] = f"http://127.0.0.1:{free_port()}"
            elif doc["kind"] == "MailboxPlacement":
                spec["system"] = system
                spec["mailboxes"] = [
                    {"address": f"user{i:02d}@corp.example", "aliases": [f"u{i:02d}@corp.example"]}
                    for i in range(1, mailboxes + 1)
                ]
        target.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")


@dataclass
class Sender:
    """Mails the moving addresses through fed, remembering what fed acknowledged."""

    host: str
    port: int
    targets: list[tuple[str, str]]  # (recipient, owning mailbox address)
    rate: float
    max_messages: int
    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> owning address
    refused: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="demo-sender", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def _run(self) -> None:
        smtp: smtplib.SMTP | None = None
        interval = 1.0 / self.rate
        started = time.monotonic()
        for n in range(self.max_messages):  # bounded in count...
            if self.stop.is_set() or time.monotonic() - started > 120:  # ...and in time
                break
            rcpt, owner = self.targets[n % len(self.targets)]
            msg = EmailMessage()
            msg["From"] = "sender@outside.example"
            msg["To"] = rcpt
            msg["Subject"] = f"live message {n}"
            msg["Message-ID"] = make_msgid(f"live{n}", "demo.example")
            msg.set_content(f"message {n} for {rcpt}\n")
            self.sent += 1
            try:
                if smtp is None:
                    smtp = smtplib.SMTP(self.host, self.port, timeout=30)
                smtp.send_message(msg, "sender@outside.example", [rcpt])
                self.acked[str(msg["Message-ID"])] = owner
            except smtplib.SMTPResponseException as exc:
                self.refused[f"{exc.smtp_code} {exc.smtp_error!r}"] += 1
            except (OSError, smtplib.SMTPException) as exc:
                self.refused[type(exc).__name__] += 1
                smtp = None
            next_at = started + (n + 1) * interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        if smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()


def fill_old_mail(driver: MailSystemDriver, mailbox_id: str, owner: str, count: int,
                  rng: random.Random) -> list[str]:
    """Old mail in INBOX, Sent and Archive/2025 with flags and old dates; a calendar."""
    ids: list[str] = []
    folders = ["INBOX", "Sent", "Archive/2025"]
    for n in range(count):
        msg = EmailMessage()
        msg["From"] = "colleague@corp.example"
        msg["To"] = owner
        msg["Subject"] = f"old message {n}"
        when = time.time() - rng.randint(30, 900) * 86400
        msg["Date"] = format_datetime(_utc(when))
        msg["Message-ID"] = make_msgid(f"old{n}", "corp.example")
        msg.set_content(f"an old message, number {n}, for {owner}\n" * rng.randint(1, 40))
        driver.append_message(mailbox_id, folders[n % len(folders)], msg.as_bytes(),
                              flags=rng.choice(["S", "RS", "FS", ""]), internal_date=when)
        ids.append(str(msg["Message-ID"]))
    driver.write_diary(mailbox_id, (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//mailferry demo//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{mailbox_id}-standup@corp.example\r\nSEQUENCE:0\r\n"
        "DTSTAMP:20261101T090000Z\r\nDTSTART:20261201T090000Z\r\n"
        "DTEND:20261201T093000Z\r\nSUMMARY:Stand-up\r\nEND:VEVENT\r\n"
        "END:VCALENDAR\r\n").encode())
    return ids


def _utc(seconds: float) -> Any:
    return datetime.fromtimestamp(seconds, UTC)


def run_demo(*, workdir: str | None, mailboxes: int, old_messages: int, rate: float,
             echo: Callable[[str], None]) -> bool:
    """Run the demo; True when nothing was lost, duplicated or delivered late."""
    if workdir is not None:
        return _run_in(Path(workdir), mailboxes=mailboxes, old_messages=old_messages,
                       rate=rate, echo=echo)
    root = Path(tempfile.mkdtemp(prefix="mailferry-demo-"))
    try:
        return _run_in(root, mailboxes=mailboxes, old_messages=old_messages, rate=rate,
                       echo=echo)
    finally:  # the temporary work folder goes; `--workdir DIR` keeps everything
        shutil.rmtree(root, ignore_errors=True)
        echo(f"demo: removed {root} (keep the files with --workdir DIR)")


def _run_in(root: Path, *, mailboxes: int, old_messages: int, rate: float,
            echo: Callable[[str], None]) -> bool:
    """The demo in `root` (its specs repository, state store, logs, mailboxes)."""
    began = time.monotonic()
    specs_dir = root / "specs"
    if specs_dir.exists():
        raise MailferryError(f"{specs_dir} exists: give an empty --workdir")
    write_specs(specs_dir, "s1", mailboxes)
    (specs_dir / ".gitignore").write_text("var/\n")
    _git(specs_dir, "init", "-q")
    _git(specs_dir, "add", ".")
    _git(specs_dir, "commit", "-qm", "Place the quickstart mailboxes on s1")
    specs = load_specs(specs_dir)
    state = f"sqlite:///{root / 'state.db'}"
    echo(f"demo: work folder {root}")

    with start_embedded(specs, log_dir=root / "logs") as servers:
        echo("demo: started " + ", ".join(f"{s.name} (pid {s.process.pid})"
                                            for s in servers.servers))
        engine = build_engine(specs, state)
        report = engine.apply()
        echo(f"demo: created {sum(1 for r in report.records if r.step == 'create')} "
             f"mailboxes on s1")
        rng = random.Random(7)
        addresses = sorted(specs.desired())
        old: dict[str, str] = {}
        s1 = engine.drivers["s1"]
        for address in addresses:
            for mid in fill_old_mail(s1, mailbox_id_for(address), address, old_messages, rng):
                old[mid] = address
        echo(f"demo: {len(old)} old messages and {len(addresses)} calendars on s1")

        targets = [(a, a) for a in addresses]
        targets += [(alias, a) for a in addresses for alias in specs.desired()[a].aliases]
        sender = Sender(specs.fed.smtp.host, specs.fed.smtp.port, targets, rate,
                        max_messages=int(rate * 90))
        sender.start()
        time.sleep(1.5)  # some live mail lands in the old mailboxes before the move

        write_specs(specs_dir, "s2", mailboxes)
        _git(specs_dir, "commit", "-qam", "Wave 1: move the quickstart mailboxes to s2")
        specs = load_specs(specs_dir)
        engine = build_engine(specs, state)
        echo(f"demo: specs moved to s2 at commit {(specs.commit or 'n/a')[:10]}; reconciling")
        applied: Counter[str] = Counter()
        engine.on_record = lambda record: applied.update([record.step] if record.ok else [])
        finished = _reconcile_until_done(engine, len(addresses), began, echo)
        echo("demo: steps applied: " + " ".join(f"{k}x{v}" for k, v in applied.items()))
        time.sleep(1.5)  # mail after the move goes straight to s2
        sender.finish()
        drained = _wait_drained(engine, echo)
        echo(f"demo: sender stopped after {sender.sent} messages")

        with engine.store.session() as session:
            rows = session.scalars(select(Migration)).all()
            holds = {m.address: m.hold_started_at for m in rows}
            states = Counter(m.state for m in rows)
        s2 = engine.drivers["s2"]
        journal = SystemStore(specs.systems["s1"].root)
        ok = _report(echo, sender, old, addresses, s2, journal, holds, states,
                     finished and drained)
    echo(f"demo: finished in {time.monotonic() - began:.1f} s")
    return ok


def _reconcile_until_done(engine: Any, count: int, began: float,
                          echo: Callable[[str], None]) -> bool:
    last: Counter[int] = Counter()
    while time.monotonic() - began < DEADLINE_S:
        engine.apply()
        with engine.store.session() as session:
            states = Counter(m.state for m in session.scalars(select(Migration)))
            failed = [m for m in session.scalars(select(Migration)) if m.failed]
        if states != last:
            echo("demo: states " + ", ".join(f"{k}:{v}" for k, v in sorted(states.items())))
            last = states
        if failed:
            for m in failed:
                echo(f"demo: FAILED {m.address} at {m.failed_step}: {m.failed_reason}")
            return False
        if states.get(13, 0) == count:
            return True
        time.sleep(0.2)
    echo("demo: deadline reached before every migration finished")
    return False


def _wait_drained(engine: Any, echo: Callable[[str], None], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = engine.fed.queue()
        if queue.pending == 0 and queue.held == 0:
            return True
        time.sleep(0.2)
    echo(f"demo: fed's queue not empty after {timeout:.0f} s: {engine.fed.queue()}")
    return False


def _report(echo: Callable[[str], None], sender: Sender, old: dict[str, str],
            addresses: list[str], s2: MailSystemDriver, journal: Any,
            holds: dict[str, Any], states: Counter[int], converged: bool) -> bool:
    found: Counter[tuple[str, str]] = Counter()  # (mailbox address, Message-ID) -> copies
    for address in addresses:
        mailbox = mailbox_id_for(address)
        for folder in s2.list_folders(mailbox):
            for msg in s2.list_messages(mailbox, folder):
                if msg.message_id:
                    found[(address, msg.message_id)] += 1
    expected = {(owner, mid) for mid, owner in {**old, **sender.acked}.items()}
    lost = sum(1 for key in expected if found[key] == 0)
    duplicated = sum(n - 1 for key, n in found.items() if n > 1)
    unexpected = sum(n for key, n in found.items() if key not in expected)
    live_found = sum(1 for mid, owner in sender.acked.items() if found[(owner, mid)] > 0)
    old_found = sum(1 for mid, owner in old.items() if found[(owner, mid)] > 0)
    late = early = 0
    for address in addresses:
        since = holds.get(address)
        for d in journal.deliveries(mailbox_id_for(address), 0.0):
            if d.action != "stored" or d.message_id not in sender.acked:
                continue
            if since is not None and d.at >= since.timestamp():
                late += 1
            else:
                early += 1
    echo("")
    echo("mailferry demo report")
    echo(f"  mailboxes migrated (state 13):        {states.get(13, 0)} of {len(addresses)}")
    echo(f"  live messages sent:                   {sender.sent}")
    echo(f"  acknowledged by fed (250):            {len(sender.acked)}")
    echo(f"  refused by fed:                       {sum(sender.refused.values())}"
         + (f" {dict(sender.refused)}" if sender.refused else ""))
    echo(f"  acknowledged found in new mailboxes:  {live_found}")
    echo(f"  old messages found in new mailboxes:  {old_found} of {len(old)}")
    echo(f"  live messages first stored in an old mailbox, then copied: {early}")
    echo(f"  delivered to an old mailbox after its hold began: {late}")
    echo(f"  unexpected messages in new mailboxes: {unexpected}")
    echo(f"lost: {lost}")
    echo(f"duplicated: {duplicated}")
    return converged and lost == 0 and duplicated == 0 and late == 0 and unexpected == 0
