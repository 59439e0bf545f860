"""E20-E24 and E30-E33 end to end: the engine, the station API and the real station agent.

The reconciler runs against fed and two maildir systems; the station agent runs as its own
process (`python -m station_agent run --once`) against the station API, checks the
workstation, uploads its local mbox archive into BOX2, switches the client profile to s2,
tests it against s2's real submission server and removes the old profile. A second case has
the user's mail client open at the second check: the migration must end at E24 with the
reason in the plan, and nothing must move.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.api.stations import enrol_station
from reconciler.api.wiring import station_api_for
from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.engine import Engine
from reconciler.state.model import Event, Migration

from world import World, mailbox_message_ids, placement, policy

pytestmark = pytest.mark.timeout(300)

MBOX = (b"From alice@corp.example Mon Jan  5 10:00:00 2026\n"
        b"From: alice@corp.example\nMessage-ID: <local1@corp.example>\nSubject: kept\n\none\n\n"
        b"From bob@corp.example Tue Jan  6 10:00:00 2026\n"
        b"From: bob@corp.example\nMessage-ID: <local2@corp.example>\nSubject: kept too\n\ntwo\n")



def setup_station(world: World, tmp_path: Path, address: str, engine: Engine) -> dict[str, Path]:
    """A workstation: token, client profile on s1, a local mbox archive, the agent's state."""
    station = f"ws-{address.partition('@')[0]}"
    paths = {"token": tmp_path / "token", "profile": tmp_path / "tb" / "profile.json",
             "mail": tmp_path / "local-mail", "state": tmp_path / "agent-state"}
    paths["token"].write_text(enrol_station(engine.store, station, address))
    paths["profile"].parent.mkdir()
    s1 = engine.specs.systems["s1"]
    paths["profile"].write_text(json.dumps({"account": {
        "address": address, "smtp": str(s1.submission), "mailbox": mailbox_id_for(address),
        "system": "s1"}}, indent=2))
    paths["mail"].mkdir()
    (paths["mail"] / "Archive").write_bytes(MBOX)
    return paths


def run_agent(api_url: str, station: str, paths: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "station_agent", "run", "--once", "--api", api_url,
         "--station", station, "--token-file", str(paths["token"]),
         "--profile", str(paths["profile"]), "--local-mail", str(paths["mail"]),
         "--state-dir", str(paths["state"]), "--min-free-mb", "1", "--retry-delay", "0.1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 2), result.stderr


def migrate_with_station(world: World, tmp_path: Path, address: str, *,
                         before_check2: object = None) -> Engine:
    station = f"ws-{address.partition('@')[0]}"
    box = [{"address": address, "station": station}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", stationChecks=True, localStationData=True)
    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    engine = world.engine(home, state)
    engine.apply()
    paths = setup_station(world, tmp_path, address, engine)
    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])
    engine = world.engine(moved, state)
    with station_api_for(engine) as api:
        for _ in range(10):  # bounded: reconcile, then let the station act
            engine.apply()
            with engine.store.session() as session:
                m = session.scalars(select(Migration).where(Migration.address == address)).one()
                action, failed = m.station_action, m.failed
            if failed or not engine.plan().pending:
                break
            if action == "check2" and callable(before_check2):
                before_check2(paths)
            run_agent(api.url, station, paths)
    engine.paths = paths  # type: ignore[attr-defined]
    return engine


def test_station_checks_local_data_and_profile_switch(world: World, tmp_path: Path) -> None:
    address = "tb@corp.example"
    engine = migrate_with_station(world, tmp_path, address)
    paths: dict[str, Path] = engine.paths  # type: ignore[attr-defined]
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.failed_reason is None
        assert m.state == 13
        assert m.mailbox_type == "mbox" and m.mailbox_size == len(MBOX)
        steps = [e.step for e in session.scalars(select(Event).where(Event.migration_id == m.id)
                                                 .order_by(Event.id))]
    for step in ("E20", "E21", "E22-E23", "E30", "E30-E33", "E41-E42"):
        assert step in steps, steps
    found = mailbox_message_ids(engine, "s2", address)
    assert found["<local1@corp.example>"] == 1 and found["<local2@corp.example>"] == 1
    assert "Local Folders/Archive" in engine.drivers["s2"].list_folders(mailbox_id_for(address))
    profile = json.loads(paths["profile"].read_text())["account"]
    assert profile["smtp"] == str(engine.specs.systems["s2"].submission)
    assert profile["system"] == "s2"
    assert not paths["profile"].with_name("profile.json.bak").exists()  # E33: old one removed
    assert engine.fed.lookup(address) == physical_address("s2", mailbox_id_for(address))


def test_negative_second_check_ends_the_migration_at_e24(world: World, tmp_path: Path) -> None:
    address = "busy@corp.example"

    def open_client(paths: dict[str, Path]) -> None:
        (paths["profile"].parent / ".parentlock").write_bytes(b"")

    engine = migrate_with_station(world, tmp_path, address, before_check2=open_client)
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.failed_step == "E24"
        assert m.state == 2  # frozen where it stood: neither address nor data moved
    [line] = [c for c in engine.plan().changes if c.address == address]
    assert line.action == "failed" and "E24" in line.reason
    assert engine.fed.lookup(address) == physical_address("s1", mailbox_id_for(address))
    assert engine.fed.holds() == {}
    assert json.loads((tmp_path / "tb" / "profile.json").read_text())["account"]["system"] == "s1"


def test_station_api_follows_the_engine_of_a_reloaded_watch(world: World, tmp_path: Path) -> None:
    """`reconcile --watch` rebuilds its engine on every spec change; the station API it
    started must then answer from the new engine's drivers and specs, not the first one's."""
    box = [{"address": "reload@corp.example"}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    first = world.engine(world.write(tmp_path / "v1", [placement("home", "s1", box)]), state)
    current = [first]
    api = station_api_for(lambda: current[0])
    _, driver_for, target_info = api._args
    assert driver_for("s1") is first.drivers["s1"]
    current[0] = world.engine(world.write(tmp_path / "v2", [placement("wave", "s2", box)]), state)
    assert driver_for("s1") is current[0].drivers["s1"]
    assert driver_for("s1") is not first.drivers["s1"]
    assert target_info("s2")["system"] == "s2"
