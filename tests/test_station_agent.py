"""The station agent end to end: `station-agent run --once` against the real station API."""

from __future__ import annotations

import json
from pathlib import Path

from station_agent.agent import Agent, AgentConfig
from station_agent.client import StationApiClient
from station_agent.outbox import Outbox

from stationkit import (
    BOX,
    MBOX_ARCHIVE,
    MBOX_SENT,
    ORIGINAL_PROFILE,
    STATION,
    UPLOADABLE,
    Workstation,
    World,
    add_migration,
    reports,
    run_agent,
    set_action,
    workstation,
    world,
)

__all__ = ["world"]  # the fixture, imported for pytest


def _kinds(w: World) -> list[str]:
    return [r.kind for r in reports(w.store)]


def _ran(result: object, ws: Workstation) -> str:
    """Agent output for assertion messages."""
    log = ws.log.read_text() if ws.log.exists() else ""
    return f"{result}\n--- agent log ---\n{log}"


def test_checks_report_type_size_and_a_running_client(world: World) -> None:
    ws = workstation(world)
    mid = add_migration(world.store, action="check1")
    result = run_agent(world, ws)
    assert result.returncode == 0, _ran(result, ws)
    [check] = reports(world.store, "check1")
    assert check.ok is True and check.migration_id == mid and check.station == STATION
    size = len(MBOX_ARCHIVE) + len(MBOX_SENT)
    assert check.detail["mailbox_type"] == "mbox"
    assert check.detail["mailbox_size"] == check.detail["local_bytes"] == size
    assert check.detail["client_running"] is False
    assert check.detail["target_reachable"] is True
    assert check.detail["free_mb"] >= 1 and check.detail["problems"] == []
    # A passed check is not redone on the next poll.
    assert run_agent(world, ws).returncode == 0
    assert len(reports(world.store, "check1")) == 1

    # Shortly before the window (E22) the user has Thunderbird open: negative check2.
    (ws.profile.parent / ".parentlock").write_bytes(b"")
    set_action(world.store, mid, "check2")
    assert run_agent(world, ws).returncode == 0
    [check2] = reports(world.store, "check2")
    assert check2.ok is False
    assert check2.detail["client_running"] is True
    assert any("mail client is running" in p for p in check2.detail["problems"])
    # Same problems on the next poll: checked again, not re-reported.
    assert run_agent(world, ws).returncode == 0
    assert len(reports(world.store, "check2")) == 1
    # The user closed it: the re-run passes and says so.
    (ws.profile.parent / ".parentlock").unlink()
    assert run_agent(world, ws).returncode == 0
    assert [r.ok for r in reports(world.store, "check2")] == [False, True]
    assert "check2 for migration" in ws.log.read_text()


def test_check_with_unreachable_target(world: World) -> None:
    ws = workstation(world)
    add_migration(world.store, action="check1")
    world.submission = "127.0.0.1:1"  # nothing listens there
    assert run_agent(world, ws).returncode == 0
    [check] = reports(world.store, "check1")
    assert check.ok is False and check.detail["target_reachable"] is False
    assert "unreachable" in " ".join(check.detail["problems"])


def test_local_migrate_uploads_once_switches_tests_and_cleans_up(world: World) -> None:
    ws = workstation(world)
    mid = add_migration(world.store, action="local-migrate", state=8)
    result = run_agent(world, ws)
    assert result.returncode == 0, _ran(result, ws)
    assert _kinds(world) == ["local-data", "switch", "test", "cleanup", "done"], _ran(result, ws)
    assert all(r.ok for r in reports(world.store))
    [data] = reports(world.store, "local-data")
    assert data.detail["uploaded"] == UPLOADABLE and data.detail["expunged"] == 1
    assert data.detail["folders"] == ["Local Folders/Archive", "Local Folders/Sent"]

    archive = world.driver.list_messages(BOX, "Local Folders/Archive")
    sent = world.driver.list_messages(BOX, "Local Folders/Sent")
    assert len(archive) == 2 and len(sent) == 1
    bodies = {world.driver.read_message(BOX, "Local Folders/Archive", m.key) for m in archive}
    assert any(b.endswith(b"kept locally for years\n") for b in bodies)
    assert not any(b"expunged" in b for b in bodies)
    assert sorted(m.flags for m in archive) == ["FS", "S"]  # read; read + starred

    account = json.loads(ws.profile.read_text())["account"]
    assert account == {"address": "jean.dupont@corp.example", "smtp": world.accepting,
                       "mailbox": BOX, "system": "s2"}
    assert json.loads(ws.profile.read_text())["ui"] == {"theme": "dark"}
    assert not ws.profile.with_name("profile.json.bak").exists()  # E33: old profile gone
    # Finished: the next poll does nothing.
    assert run_agent(world, ws).returncode == 0
    assert len(reports(world.store)) == 5

    # An admin re-issues the action: the manifest means nothing is uploaded again ...
    set_action(world.store, mid, "local-migrate")
    assert run_agent(world, ws).returncode == 0
    again = reports(world.store, "local-data")[-1]
    assert (again.detail["uploaded"], again.detail["skipped"]) == (0, UPLOADABLE)
    # ... and without the manifest the API's own check still refuses duplicates.
    for manifest in ws.state_dir.glob("manifest-*.txt"):
        manifest.unlink()
    set_action(world.store, mid, "local-migrate")
    assert run_agent(world, ws).returncode == 0
    last = reports(world.store, "local-data")[-1]
    assert (last.detail["uploaded"], last.detail["present"]) == (0, UPLOADABLE)
    assert len(world.driver.list_messages(BOX, "Local Folders/Archive")) == 2


def test_local_migrate_waits_while_the_mail_client_runs(world: World) -> None:
    ws = workstation(world)
    add_migration(world.store, action="local-migrate", state=8)
    (ws.profile.parent / "lock").symlink_to("127.0.0.1:+4242")  # Thunderbird's dangling link
    for _ in range(2):  # polled twice, reported once
        assert run_agent(world, ws).returncode == 0
    [waiting] = reports(world.store)
    assert (waiting.kind, waiting.ok) == ("local-data", False)
    assert "mail client is running" in waiting.detail["problems"][0]
    assert ws.profile.read_bytes() == ORIGINAL_PROFILE
    assert "Local Folders/Archive" not in world.driver.list_folders(BOX)
    (ws.profile.parent / "lock").unlink()
    assert run_agent(world, ws).returncode == 0
    assert _kinds(world)[-1] == "done"


def test_failed_test_rolls_back_byte_for_byte_retries_then_fails(world: World) -> None:
    ws = workstation(world)
    world.submission = world.refusing  # the new server answers 550 to RCPT
    add_migration(world.store, action="local-migrate", state=8)
    result = run_agent(world, ws, "--retries", "2")
    assert result.returncode == 0, _ran(result, ws)
    kinds = _kinds(world)
    assert kinds == ["local-data", "switch", "test", "rollback"] * 3 + ["failed"], kinds
    tests = reports(world.store, "test")
    assert [t.ok for t in tests] == [False] * 3 and tests[0].detail["code"] == 550
    assert [r.detail["attempt"] for r in reports(world.store, "rollback")] == [1, 2, 3]
    [failed] = reports(world.store, "failed")
    assert failed.ok is False and "550" in failed.detail["last_error"]
    # Only the first attempt uploaded anything.
    assert [r.detail["uploaded"] for r in reports(world.store, "local-data")] == [3, 0, 0]
    assert ws.profile.read_bytes() == ORIGINAL_PROFILE
    assert not ws.profile.with_name("profile.json.bak").exists()
    assert "FAILED after 3 attempt(s)" in ws.log.read_text()
    # Failed is final for this action: the next poll does not start over.
    assert run_agent(world, ws).returncode == 0
    assert len(reports(world.store)) == len(kinds)


class _OutageClient(StationApiClient):
    """Fetches the task, then the API goes down (the VPN dropped mid-check)."""

    def __init__(self, world: World) -> None:
        super().__init__(world.api, STATION, world.tokens[STATION], timeout=5)
        self.world = world

    def get_task(self) -> dict[str, object]:
        task = super().get_task()
        self.world.server.stop()
        return task


def test_reports_survive_an_api_outage(world: World) -> None:
    ws = workstation(world)
    add_migration(world.store, action="check1")
    config = AgentConfig(api=world.api, station=STATION, token=world.tokens[STATION],
                         profile=ws.profile, local_mail=ws.local_mail, state_dir=ws.state_dir,
                         min_free_mb=1)
    agent = Agent(config, _OutageClient(world))
    result = agent.run_once()
    assert result.pending == 1
    # One more result queued while the API is still down, to check the order is kept.
    Outbox(ws.state_dir).put(None, "test", True, {"note": "queued second"})
    pending = sorted(Path(ws.state_dir / "outbox").glob("*.json"))
    assert len(pending) == 2
    assert json.loads(pending[0].read_text())["kind"] == "check1"
    assert reports(world.store) == []

    # Still down: the agent says so (exit 2) and keeps everything.
    down = run_agent(world, ws)
    assert down.returncode == 2
    assert len(list((ws.state_dir / "outbox").glob("*.json"))) == 2
    assert "unreachable" in ws.log.read_text()

    world.restart_api()
    up = run_agent(world, ws)
    assert up.returncode == 0, _ran(up, ws)
    assert _kinds(world) == ["check1", "test"]  # delivered, in order, once each
    assert list((ws.state_dir / "outbox").glob("*.json")) == []
    assert reports(world.store)[0].ok is True
