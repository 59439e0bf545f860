"""A Thunderbird workstation end to end: checks, IMAP upload to a real Dovecot, the switch,
its test against real IMAP and SMTP servers, rollback, cleanup -- `station-agent run --once
--config FILE` as a subprocess, against the real station API.
"""

from __future__ import annotations

import email
import imaplib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.mail.imap.mutf7 import decode as decode_mutf7
from reconciler.api.enrolment import write_station_kit
from station_agent.clients import POP3_POLICIES
from station_agent.config import load as load_config
from station_agent.thunderbird.prefs import Prefs

from dovecot import Dovecot, private_root, skip_unless_available
from stationkit import REPO, STATION, World, add_migration, reports, set_action, world
from tb_kit import (
    ADDRESS,
    EXPECTED,
    OLD_HOST,
    POP3_PREFS,
    POP_EXPECTED,
    POP_HOST,
    PREFS,
    UPLOADABLE,
    Installation,
    dead_pid,
    local_bytes,
    lock_like_thunderbird,
    make_installation,
    make_pop3_installation,
    sleeper,
)

__all__ = ["world"]  # the fixture, imported for pytest
PASSWORD = "s3cret-jean"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    """The target system's IMAP server, with jean's account."""
    skip_unless_available()
    root = private_root()
    users = {ADDRESS: PASSWORD, **{f"pop-{p}@corp.example": PASSWORD for p in POP3_POLICIES}}
    server = Dovecot(root, "target", users).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _setup(world: World, dovecot: Dovecot, tmp_path: Path, *, pop3: bool = False,
           extra: str = "") -> tuple[Installation, Path]:
    """A workstation enrolled the help-desk way: the kit `reconcile station enrol --out` writes."""
    world.imap = {"host": "127.0.0.1", "port": dovecot.port, "tls": "none"}
    inst = (make_pop3_installation if pop3 else make_installation)(tmp_path / "home")
    kit = tmp_path / "kit"
    _, config = write_station_kit(kit, api=world.api, station=STATION, address=ADDRESS,
                                  token=world.tokens[STATION])
    (kit / "imap.password").write_text(PASSWORD + "\n")
    text = config.read_text()
    text = text.replace('archives = []', f'archives = ["{inst.archive}"]\n'
                        f'profiles_ini = "{inst.ini}"')
    text = text.replace("min_free_mb = 100", "min_free_mb = 1") + extra
    text = text.replace("retry_delay = 30", "retry_delay = 0.05").replace("retries = 3",
                                                                          "retries = 1")
    config.write_text(text)
    return inst, config


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "station_agent", "run", "--once",
                             "--config", str(config)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    return result


def _log(config: Path) -> str:
    path = config.parent / "agent.log"
    return path.read_text() if path.exists() else ""


def _imap_contents(dovecot: Dovecot, user: str = ADDRESS
                   ) -> dict[str, list[tuple[str, str, str]]]:
    """folder -> [(Message-ID, flags, INTERNALDATE)] as jean's IMAP client sees them."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    conn = imaplib.IMAP4("127.0.0.1", dovecot.port, timeout=30)
    try:
        conn.login(user, PASSWORD)
        _, listing = conn.list('""', "*")
        for line in listing:
            assert isinstance(line, bytes)
            name = line.decode().rsplit(' "/" ', 1)[1].strip('"')
            _, count = conn.select(f'"{name}"', readonly=True)
            if int(count[0] or 0) == 0:
                out[decode_mutf7(name)] = []
                continue
            _, data = conn.fetch("1:*", "(FLAGS INTERNALDATE BODY.PEEK[HEADER])")
            items = []
            for part in data:
                if isinstance(part, tuple):
                    head = part[0].decode()
                    msg = email.message_from_bytes(part[1])
                    flags = head.split("FLAGS (")[1].split(")")[0]
                    when = head.split('INTERNALDATE "')[1].split('"')[0]
                    items.append((str(msg["Message-ID"]), flags, when))
            out[decode_mutf7(name)] = items
    finally:
        conn.logout()
    return out


def test_enrol_kit_is_a_ready_configuration(world: World, tmp_path: Path) -> None:
    token, config = write_station_kit(tmp_path, api=world.api, station=STATION,
                                      address=ADDRESS, token=world.tokens[STATION])
    assert token.stat().st_mode & 0o777 == 0o600
    settings = load_config(config)
    assert settings["api"] == world.api and settings["station"] == STATION
    assert settings["token_file"] == token and settings["client"] == "thunderbird"
    assert settings["imap_password_file"] == tmp_path / "imap.password"


def test_checks_switch_upload_and_cleanup(world: World, dovecot: Dovecot,
                                          tmp_path: Path) -> None:
    inst, config = _setup(world, dovecot, tmp_path)
    mid = add_migration(world.store, action="check1")
    result = _run(config)
    assert result.returncode == 0, _log(config)
    [check] = reports(world.store, "check1")
    assert check.ok, check.detail
    assert check.detail["client"] == "thunderbird"
    assert check.detail["mailbox_size"] == local_bytes()

    original = inst.prefs.read_bytes()
    set_action(world.store, mid, "local-migrate")
    result = _run(config)
    assert result.returncode == 0, _log(config)
    kinds = [r.kind for r in reports(world.store)][1:]
    assert kinds == ["local-data", "switch", "test", "cleanup", "done"], _log(config)
    [data] = reports(world.store, "local-data")
    assert data.detail["via"] == "imap" and data.detail["uploaded"] == UPLOADABLE
    assert data.detail["expunged"] == 1
    [test] = reports(world.store, "test")
    assert "SELECT INBOX ok" in test.detail["imap"]

    seen = _imap_contents(dovecot)
    for folder, ids in EXPECTED.items():
        assert {m for m, _, _ in seen[folder]} == ids, (folder, seen)
    flags = {m: f for items in seen.values() for m, f, _ in items}
    assert "\\Seen" in flags["<tb-a1@x.example>"] and "\\Flagged" in flags["<tb-c1@z.example>"]
    assert "\\Seen" not in flags["<tb-d1@w.example>"]
    # Thunderbird's tags (X-Mozilla-Keys) are keywords Thunderbird will show again.
    assert {"$label1", "projet_x"} <= set(flags["<tb-a1@x.example>"].split())
    assert "$label1" not in flags["<tb-c1@z.example>"]
    dates = {m: d for items in seen.values() for m, _, d in items}
    expected_when = time.strftime("%d-%b-%Y %H:%M:%S",
                                  time.localtime(time.mktime((2019, 3, 1, 9, 30, 0, 0, 0, -1))))
    assert dates["<tb-d1@w.example>"].startswith(expected_when)

    prefs = Prefs.load(inst.prefs)
    assert prefs.get("mail.server.server1.hostname") == "127.0.0.1"
    assert prefs.get("mail.server.server1.port") == dovecot.port
    assert prefs.get("mail.server.server1.userName") == ADDRESS
    assert prefs.get("mail.smtpserver.smtp1.port") == int(world.accepting.rsplit(":")[1])
    assert prefs.get("mail.server.server2.hostname") == "imap.gmail.com"
    assert not (inst.profile / "prefs.js.mailferry-backup").exists()  # E33
    assert not (inst.profile / "ImapMail" / OLD_HOST).exists()  # the old server's cache too
    [cleanup] = reports(world.store, "cleanup")
    assert cleanup.detail["old_folders"] == [str(inst.profile / "ImapMail" / OLD_HOST)]
    assert not [k for k in prefs.keys("") if OLD_HOST in str(prefs.get(k))]
    assert inst.prefs.read_bytes() != original
    log = _log(config)
    assert "local mail upload:" in log and "profile test passed" in log

    # A crash right after each APPEND, before its acknowledgement reached the manifest:
    # the re-run finds the messages on the server and appends nothing.
    manifest = tmp_path / "kit" / "state" / f"manifest-{mid}.txt"
    lines = manifest.read_text().splitlines()
    manifest.write_text("".join(f"{ln}\n" for ln in lines if ln.startswith("?")))
    set_action(world.store, mid, "local-migrate")
    result = _run(config)
    assert result.returncode == 0, _log(config)
    again = reports(world.store, "local-data")[-1]
    assert (again.detail["uploaded"], again.detail["present"]) == (0, UPLOADABLE), again.detail
    assert _imap_contents(dovecot) == seen


def test_refused_test_rolls_back_byte_for_byte(world: World, dovecot: Dovecot,
                                               tmp_path: Path) -> None:
    inst, config = _setup(world, dovecot, tmp_path)
    world.submission = world.refusing  # the new submission server answers 550 to RCPT
    add_migration(world.store, action="local-migrate", state=8)
    original = inst.prefs.read_bytes()
    result = _run(config)
    assert result.returncode == 0, _log(config)
    kinds = [r.kind for r in reports(world.store)]
    assert kinds == ["local-data", "switch", "test", "rollback"] * 2 + ["failed"], kinds
    assert inst.prefs.read_bytes() == original == PREFS.encode()
    assert not (inst.profile / "prefs.js.mailferry-backup").exists()
    assert "550" in reports(world.store, "failed")[0].detail["last_error"]
    assert "FAILED after 2 attempt(s)" in _log(config)


def test_wrong_imap_password_keeps_the_old_settings(world: World, dovecot: Dovecot,
                                                    tmp_path: Path) -> None:
    inst, config = _setup(world, dovecot, tmp_path)
    (config.parent / "imap.password").write_text("wrong\n")
    add_migration(world.store, action="local-migrate", state=8)
    assert _run(config).returncode == 0, _log(config)
    [data] = reports(world.store)
    assert data.kind == "local-data" and data.ok is False
    assert "LOGIN failed" in data.detail["problems"][0]
    assert inst.prefs.read_bytes() == PREFS.encode()


def test_a_running_thunderbird_is_waited_for_a_dead_one_is_not(world: World, dovecot: Dovecot,
                                                               tmp_path: Path) -> None:
    inst, config = _setup(world, dovecot, tmp_path)
    mid = add_migration(world.store, action="check2")
    live = sleeper()
    try:
        lock_like_thunderbird(inst.profile, live.pid)
        assert _run(config).returncode == 0, _log(config)
        [check] = reports(world.store, "check2")
        assert check.ok is False and check.detail["client_running"] is True
        assert any(f"process {live.pid}" in p for p in check.detail["problems"])
        set_action(world.store, mid, "local-migrate")
        assert _run(config).returncode == 0
        waiting = reports(world.store, "local-data")[-1]
        assert waiting.ok is False and "Thunderbird is running" in waiting.detail["problems"][0]
        assert inst.prefs.read_bytes() == PREFS.encode()
    finally:
        live.kill()
        live.wait(timeout=30)
    # Thunderbird crashed and left its lock: a dead PID is not a running client.
    os.unlink(inst.profile / "lock")
    lock_like_thunderbird(inst.profile, dead_pid())
    assert _run(config).returncode == 0, _log(config)
    assert reports(world.store)[-1].kind == "done", _log(config)


@pytest.mark.parametrize("policy", POP3_POLICIES)
def test_pop3_mail_is_uploaded_and_kept_until_cleanup(world: World, dovecot: Dovecot,
                                                     tmp_path: Path, policy: str) -> None:
    user = f"pop-{policy}@corp.example"  # a mailbox of its own per policy
    inst, config = _setup(world, dovecot, tmp_path, pop3=True)
    text = config.read_text().replace('pop3_folders = "account"', f'pop3_folders = "{policy}"')
    text = text.replace("cleanup_delay = 0", "cleanup_delay = 1")
    config.write_text(text.replace("# user = ", f'user = "{user}"\n# user = '))
    add_migration(world.store, action="local-migrate", state=8)
    result = _run(config)
    assert result.returncode == 0, _log(config)
    assert [r.kind for r in reports(world.store)] == ["local-data", "switch", "test", "done"], \
        [(r.kind, r.detail) for r in reports(world.store)]
    seen = _imap_contents(dovecot, user)
    root = "Work POP/" if policy == "account" else ""
    for folder, ids in POP_EXPECTED.items():
        name = root + (folder if root else folder.replace("Inbox", "INBOX"))
        assert {m for m, _, _ in seen[name]} == ids, (name, seen)
    for folder, ids in EXPECTED.items():  # Local Folders as ever
        assert {m for m, _, _ in seen[folder]} == ids, (folder, seen)
    flags = {m: f for items in seen.values() for m, f, _ in items}
    assert "$label2" in flags["<pop-g1@t.example>"] and "\\Seen" in flags["<pop-g1@t.example>"]
    assert "projet_x" in flags["<pop-k1@q.example>"]
    assert "<pop-i1@r.example>" not in flags  # deleted in Thunderbird: not uploaded
    prefs = Prefs.load(inst.prefs)
    assert prefs.get("mail.server.server1.type") == "imap"
    assert prefs.get("mail.server.server1.port") == dovecot.port
    assert not [k for k in prefs.keys("") if POP_HOST in str(prefs.get(k))]
    # Until the cleanup the old mbox files and settings stay (the help desk's way back).
    pop_dir = inst.profile / "Mail" / POP_HOST
    assert (pop_dir / "Inbox").read_bytes().startswith(b"From gina@")
    assert (inst.profile / "prefs.js.mailferry-backup").read_bytes() == POP3_PREFS.encode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not reports(world.store, "cleanup"):
        time.sleep(0.3)
        assert _run(config).returncode == 0, _log(config)
    [cleanup] = reports(world.store, "cleanup")
    assert str(pop_dir) in cleanup.detail["old_folders"], cleanup.detail
    assert not pop_dir.exists() and not (inst.profile / "Mail" / f"{POP_HOST}.msf").exists()
    assert (inst.profile / "Mail" / "Local Folders" / "Archive").exists()
    assert not (inst.profile / "prefs.js.mailferry-backup").exists()


def test_enrol_is_one_command(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "--state", str(tmp_path / "state.db"), "station",
         "enrol", "ws-paul", "--address", "Paul@corp.example", "--out", str(kit),
         "--api", "https://mailferry.corp.example:8443"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "station-agent run --config station-agent.toml" in result.stdout
    settings = load_config(kit / "station-agent.toml")
    assert settings["address"] == "paul@corp.example"
    assert settings["api"] == "https://mailferry.corp.example:8443"
    assert (kit / "station.token").stat().st_mode & 0o777 == 0o600
