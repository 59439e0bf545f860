"""Shared fixtures and world of the station API and station agent tests (a harness, not a test
module: test_station_api, test_station_agent, test_station_fuzz and the Thunderbird tests use it).

Why real pieces: the station's contract is on the wire -- HTTP with tokens, an SMTP dialogue
with the target's submission server, files on the workstation -- so the tests run the real
station API (`StationApiServer` on a free loopback port, a real SQLite state store), real
aiosmtpd servers as the target's submission server (one accepting RCPT, one answering 550),
the real embedded maildir driver as the target system, and the agent as a subprocess exactly
as a workstation runs it. Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from reconciler.api.server import StationApiServer
from reconciler.api.stations import enrol_station
from reconciler.drivers.base import MailSystemDriver
from reconciler.drivers.maildir import MaildirDriver
from reconciler.state.model import Migration, StationReport
from reconciler.state.store import Store, open_store

from sysutil import free_port

REPO = Path(__file__).resolve().parent.parent
ADDR = "jean.dupont@corp.example"
BOX = "jean.dupont=corp.example"
STATION = "ws-jean"
OTHER_ADDR = "marie.curie@corp.example"
OTHER_STATION = "ws-marie"
AGENT_TIMEOUT = 90

ORIGINAL_PROFILE = (b'{"account": {"address": "jean.dupont@corp.example", '
                    b'"smtp": "old-mail.corp.example:25", "mailbox": "jdupont", '
                    b'"system": "s1"},\n "ui": {"theme": "dark"}}\n')

# Two local folders. The second message of Archive is marked expunged by Thunderbird
# (X-Mozilla-Status 0x0009): deleted mail that must not be uploaded.
MBOX_ARCHIVE = (
    b"From alice@x.example Mon Jan  2 10:00:00 2023\n"
    b"From: alice@x.example\nTo: jean.dupont@corp.example\nSubject: old one\n"
    b"Message-ID: <a1@x.example>\nX-Mozilla-Status: 0001\n\nkept locally for years\n\n"
    b"From bob@y.example Tue Jan  3 11:00:00 2023\n"
    b"From: bob@y.example\nSubject: deleted\nMessage-ID: <b1@y.example>\n"
    b"X-Mozilla-Status: 0009\n\nexpunged, not compacted\n\n"
    b"From carol@z.example Wed Jan  4 12:00:00 2023\n"
    b"From: carol@z.example\nSubject: flagged\nMessage-ID: <c1@z.example>\n"
    b"X-Mozilla-Status: 0005\n\nimportant\n\n"
)
MBOX_SENT = (
    b"From jean.dupont@corp.example Thu Jan  5 13:00:00 2023\n"
    b"From: jean.dupont@corp.example\nTo: alice@x.example\nSubject: reply\n"
    b"Message-ID: <d1@corp.example>\n\nthanks\n\n"
)
UPLOADABLE = 3  # messages to upload: 2 in Archive, 1 in Sent


class RcptHandler:
    """A submission server's RCPT policy: accept, or refuse with 550."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.rcpts: list[str] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        """Accept or refuse the recipient."""
        self.rcpts.append(address)
        if not self.accept:
            return f"550 5.1.1 <{address}>: recipient unknown here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


@dataclass
class World:
    """Everything a station test needs, started and wired together."""

    tmp: Path
    store: Store
    driver: MaildirDriver
    server: StationApiServer
    accepting: str  # host:port of the submission server that accepts RCPT
    refusing: str  # host:port of the one that answers 550
    submission: str = ""  # what target_info currently tells stations
    tokens: dict[str, str] = field(default_factory=dict)
    imap: dict[str, object] | None = None  # the target's IMAP server, when a test has one

    @property
    def api(self) -> str:
        return self.server.url

    def target_info(self, system: str) -> dict[str, object]:
        info: dict[str, object] = {"submission": self.submission, "mailbox_type": "maildir"}
        if self.imap is not None:
            info["imap"] = self.imap
        return info

    def driver_for(self, system: str) -> MailSystemDriver:
        assert system == "s2", system
        return self.driver

    def restart_api(self) -> None:
        """Start a new API server on the same port (after an outage)."""
        self.server = StationApiServer(self.store, self.driver_for, self.target_info,
                                       port=self.server.port).start()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A state store, a target maildir system, two submission servers, the station API."""
    store = open_store("sqlite:///" + str(tmp_path / "state.db"))
    driver = MaildirDriver("s2", tmp_path / "s2", ("127.0.0.1", 1), ("127.0.0.1", 2),
                           "s2.internal")
    driver.create_mailbox(BOX, access_addresses=(ADDR,))
    ok_port, ko_port = free_port(), free_port()
    accepting = Controller(RcptHandler(True), hostname="127.0.0.1", port=ok_port)
    refusing = Controller(RcptHandler(False), hostname="127.0.0.1", port=ko_port)
    accepting.start()
    refusing.start()
    w = World(tmp=tmp_path, store=store, driver=driver, server=None,  # type: ignore[arg-type]
              accepting=f"127.0.0.1:{ok_port}", refusing=f"127.0.0.1:{ko_port}")
    w.submission = w.accepting
    w.server = StationApiServer(store, w.driver_for, w.target_info).start()
    w.tokens[STATION] = enrol_station(store, STATION, ADDR)
    w.tokens[OTHER_STATION] = enrol_station(store, OTHER_STATION, OTHER_ADDR)
    try:
        yield w
    finally:
        w.server.stop()
        accepting.stop()
        refusing.stop()
        store.close()


def add_migration(store: Store, *, address: str = ADDR, action: str | None = None,
                  state: int = 1, failed: bool = False) -> int:
    """Insert a migration row as the engine would have left it; return its id."""
    with store.session() as session:
        row = Migration(address=address, source_system="s1", target_system="s2",
                        source_mailbox=address.replace("@", "="),
                        target_mailbox=address.replace("@", "="), placement="default",
                        state=state, station_action=action,
                        station_action_since=datetime.now(UTC) if action else None,
                        failed_reason="E24: second check negative" if failed else None)
        session.add(row)
        session.flush()
        return row.id


def set_action(store: Store, migration_id: int, action: str | None) -> None:
    """The engine (re)issues an action: a new action_since."""
    with store.session() as session:
        row = session.get(Migration, migration_id)
        assert row is not None
        row.station_action = action
        row.station_action_since = datetime.now(UTC)


def reports(store: Store, kind: str | None = None) -> list[StationReport]:
    """Stored reports, oldest first."""
    with store.session() as session:
        query = select(StationReport).order_by(StationReport.id)
        if kind is not None:
            query = query.where(StationReport.kind == kind)
        return list(session.scalars(query))


def http(method: str, url: str, token: str | None = None,
         body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request; (status, parsed JSON body)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Workstation:
    """The files of one workstation: token, profile, local mail, agent state."""

    token_file: Path
    profile: Path
    local_mail: Path
    state_dir: Path
    log: Path


def workstation(w: World) -> Workstation:
    """Lay out jean's workstation under the test's tmp dir."""
    root = w.tmp / "ws"
    (root / "profile").mkdir(parents=True)
    (root / "mail").mkdir()
    token_file = root / "token"
    token_file.write_text(w.tokens[STATION] + "\n")
    profile = root / "profile" / "profile.json"
    profile.write_bytes(ORIGINAL_PROFILE)
    (root / "mail" / "Archive").write_bytes(MBOX_ARCHIVE)
    (root / "mail" / "Archive.msf").write_bytes(b"// <!-- <mdb:mork:z v=\"1.4\"/> -->\n")
    (root / "mail" / "Sent").write_bytes(MBOX_SENT)
    return Workstation(token_file, profile, root / "mail", root / "state", root / "agent.log")


def run_agent(w: World, ws: Workstation, *extra: str) -> subprocess.CompletedProcess[str]:
    """`python -m station_agent run --once ...` as a workstation would run it."""
    command = [sys.executable, "-m", "station_agent", "run", "--once", "--api", w.api,
               "--station", STATION, "--token-file", str(ws.token_file),
               "--profile", str(ws.profile), "--local-mail", str(ws.local_mail),
               "--state-dir", str(ws.state_dir), "--min-free-mb", "1",
               "--retry-delay", "0.05", "--log", str(ws.log), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=AGENT_TIMEOUT, check=False)
