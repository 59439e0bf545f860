"""Waves into a busy target: bounded load through fed and from local users, exact accounting.

Used by `test_busy_target.py` and `bench/cutover_load.py`. While the reconciler moves
mailboxes in waves, `Load` sends mail at a fixed rate through fed's SMTP port (outside
senders) and straight into the mail systems' own SMTP servers (their local users), every
message with its own Message-ID, and remembers which of them were acknowledged (250). At
the end `account` reads every mailbox of every system and compares: each acknowledged
message must be found exactly once, in the final mailbox of the address it was written to,
and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import random
import smtplib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import Engine
from reconciler.state.model import Event, Migration

from helpers import mail
from pfdovecot import MailHost
from world import World, run_cli


def message(mid: str, to: str, sender: str) -> bytes:
    return mail.message("load", mid, mid, sender=sender, to=to)


@dataclass
class Sent:
    """One acknowledged message."""

    mid: str
    rcpt: str
    via: str
    at: float


class Stream(threading.Thread):
    """One SMTP client sending `rate` messages/s to random recipients, until stopped or
    `limit` seconds passed (bounded in time and count)."""

    def __init__(self, name: str, port: int, rcpts: Callable[[], list[str]], rate: float,
                 sender: str, acked: list[Sent], refused: list[tuple[str, str]],
                 limit: float = 600.0, seed: int = 0, host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(daemon=True, name=name)
        self.host, self.tls = host, tls  # tls: STARTTLS before anything is sent
        self.port, self.rcpts, self.rate, self.sender = port, rcpts, rate, sender
        self.acked, self.refused, self.limit = acked, refused, limit
        self.halt = threading.Event()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def run(self) -> None:
        start = time.monotonic()
        n = 0
        client: smtplib.SMTP | None = None
        while not self.halt.is_set() and time.monotonic() - start < self.limit \
                and n < int(self.rate * self.limit):
            due = start + n / self.rate
            pause = due - time.monotonic()
            if pause > 0:
                self.halt.wait(pause)
            rcpts = self.rcpts()
            if not rcpts:
                n += 1
                continue
            rcpt = self.rng.choice(rcpts)
            mid = f"<{self.name}-{n}@load.test>"
            n += 1
            try:
                if client is None:
                    client = smtplib.SMTP(self.host, self.port, timeout=30)
                    client.ehlo("load.test")
                    if self.tls is not None:
                        client.starttls(context=self.tls)
                        client.ehlo("load.test")
                client.sendmail(self.sender, [rcpt], message(mid, rcpt, self.sender))
                self.acked.append(Sent(mid, rcpt, self.name, time.time()))
            except (OSError, smtplib.SMTPException) as exc:
                self.refused.append((mid, f"{rcpt}: {exc}"))
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.close()
                client = None
        if client is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                client.quit()


@dataclass
class Load:
    """Streams through fed and into each system's own SMTP server (its local users)."""

    fed_port: int
    local_ports: dict[str, int]  # system -> its SMTP port (local users submit there)
    rcpts: Callable[[], list[str]]
    fed_rate: float = 20.0
    local_rate: float = 10.0  # in total, spread over the systems
    streams: int = 2  # fed streams
    limit: float = 600.0
    acked: list[Sent] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    threads: list[Stream] = field(default_factory=list)
    fed_host: str = "127.0.0.1"
    local_hosts: dict[str, str] = field(default_factory=dict)  # system -> address (default lo)
    local_tls: ssl.SSLContext | None = None  # STARTTLS to the systems' own SMTP servers

    def start(self) -> Load:
        for i in range(self.streams):
            self.threads.append(Stream(f"fed{i}", self.fed_port, self.rcpts,
                                       self.fed_rate / self.streams, "loadgen@outside.test",
                                       self.acked, self.refused, self.limit, seed=i,
                                       host=self.fed_host))
        for i, (system, port) in enumerate(sorted(self.local_ports.items())):
            self.threads.append(Stream(f"local-{system}", port, self.rcpts,
                                       self.local_rate / len(self.local_ports),
                                       f"local-{system}@corp.example", self.acked,
                                       self.refused, self.limit, seed=100 + i,
                                       host=self.local_hosts.get(system, "127.0.0.1"),
                                       tls=self.local_tls))
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        for thread in self.threads:
            thread.halt.set()
        for thread in self.threads:
            thread.join(60)


@dataclass
class Accounting:
    acknowledged: int
    lost: list[str]
    duplicated: list[str]
    misplaced: list[str]

    def line(self, hold: float) -> str:
        return (f"cutover under load: acknowledged {self.acknowledged}, lost {len(self.lost)}, "
                f"duplicated {len(self.duplicated)}, misplaced {len(self.misplaced)}, "
                f"longest hold {hold:.2f} s")


def account(acked: Iterable[Sent], found: dict[str, Counter[str]],
            home: Callable[[str], str]) -> Accounting:
    """`found`: mailbox key -> Message-ID counts; `home(rcpt)`: the key it must be in."""
    where: dict[str, Counter[str]] = {}
    for key, ids in found.items():
        for mid, n in ids.items():
            where.setdefault(mid, Counter())[key] += n
    lost, dup, misplaced = [], [], []
    sent = list(acked)
    for s in sent:
        places = where.get(s.mid, Counter())
        total = sum(places.values())
        if total == 0:
            lost.append(f"{s.mid} -> {s.rcpt}")
        elif total > 1:
            dup.append(f"{s.mid} -> {s.rcpt}: {dict(places)}")
        elif places[home(s.rcpt)] != 1:
            misplaced.append(f"{s.mid} -> {s.rcpt}: in {list(places)}, not {home(s.rcpt)}")
    return Accounting(len(sent), lost, dup, misplaced)


def layout_documents(layout: dict[str, str], policy_doc: dict[str, object]
                     ) -> list[dict[str, object]]:
    """Placements (one per system, moves back allowed) putting each address where `layout`
    says, plus the policy."""
    by_system: dict[str, list[dict[str, str]]] = {}
    for address, system in sorted(layout.items()):
        by_system.setdefault(system, []).append({"address": address})
    docs: list[dict[str, object]] = [policy_doc]
    for system, boxes in sorted(by_system.items()):
        docs.append({"apiVersion": "mailferry/v1", "kind": "MailboxPlacement",
                     "metadata": {"name": f"on-{system}"},
                     "spec": {"system": system, "mailboxes": boxes, "window": "always",
                              "policy": str(policy_doc["metadata"]["name"]),  # type: ignore[index]
                              "allowMoveBack": True}})
    return docs


def run_wave(world: World, directory: Path, state: str, layout: dict[str, str],
             policy_doc: dict[str, object], *, failpoint: str | None = None,
             log: Callable[[str], None] = lambda _line: None) -> None:
    """Write the specs for `layout` and reconcile until nothing is pending.

    With `failpoint` (``STEP:after-action`` or ``STEP:after-commit``) the first run is a real
    ``reconcile --apply`` killed with SIGKILL right there; then it is simply run again."""
    world.write(directory, layout_documents(layout, policy_doc))
    if failpoint:
        result = run_cli("--specs", str(directory), "--state", state, "--apply",
                         cwd=directory, env={"MAILFERRY_FAILPOINT": failpoint}, timeout=300)
        log(f"reconcile --apply with {failpoint}: exit {result.returncode}")
    for _ in range(30):  # bounded: each apply runs until nothing more is due now
        engine = world.engine(directory, state)
        report = engine.apply()
        for record in report.errors:
            log(f"  {record.address} {record.step}: {record.message}")
        if not engine.plan().pending:
            return
        with engine.store.session() as session:  # retry what backed off at once
            for m in session.scalars(select(Migration)):
                m.next_attempt_at = None
        time.sleep(0.5)
    raise AssertionError(f"still pending after 30 runs: {engine.plan().pending}")


def drain(engine: Engine, hosts: Iterable[MailHost], timeout: float = 120.0) -> None:
    """Until fed's queue and every Postfix queue are empty (bounded)."""
    hosts = list(hosts)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.fed.queue().pending == 0 and all(h.queue_files() == 0 for h in hosts):
            return
        time.sleep(0.3)
    raise AssertionError(f"queues not empty after {timeout:.0f} s: {engine.fed.queue()}")


def collect(hosts: dict[str, MailHost], addresses: Iterable[str]) -> dict[str, Counter[str]]:
    """'system/address' -> Message-ID counts, read by doveadm from every real mailbox."""
    return {f"{name}/{address}": host.message_ids(mailbox_id_for(address))
            for name, host in hosts.items() for address in addresses}


def longest_hold(engine: Engine) -> float:
    """The longest hold of any flip so far (E9 records how long its hold lasted)."""
    with engine.store.session() as session:
        return max((float(json.loads(e.detail or "{}").get("held_seconds", 0.0))
                    for e in session.scalars(select(Event).where(Event.step == "E9"))),
                   default=0.0)
