"""The state machine against real servers, in every combination of the patent's modes.

Each case creates a mailbox on s1 with old mail and a calendar, moves its placement to s2
under one policy, and reconciles. Station reports (what the station API would store) are
written when the engine asks for them. The test then checks three things that could each
fail on their own: the sequence of recorded states is the one the patent's Figure 2 gives
for those modes, each transition's event names its patent step, and the real world agrees
(fed's directory, what BOX2 holds, whether BOX1 still exists).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.engine import Engine
from reconciler.state.model import Event, Migration, StationReport

from world import World, mailbox_message_ids, placement, policy

pytestmark = pytest.mark.timeout(300)



def expected_path(station: bool, transfer: str, local: bool, delete: bool) -> list[tuple[str, int]]:
    """(event step, to state) in order, straight from the patent's Figure 2."""
    if transfer == "diary-only":
        return [("E1", 0), ("E2", 1), ("E13-E16", 7), ("E17", 8), ("E40", 10)]
    path = [("E1", 0), ("E2", 1)]
    if station:
        path += [("E20", 2), ("E22-E23", 3)]
    path += [("E4", 4), ("E5-E8", 5), ("E9", 6)]
    if transfer != "none":
        path += [("E11-E14", 7), ("E15", 8)]
    if local:
        path += [("E30-E33", 9)]
    path += [("E40", 10)]
    if delete:
        path += [("E41-E42", 13)]
    return path


def answer_station(engine: Engine) -> int:
    """Store an ok report for every station action the engine asked for; count them."""
    answered = 0
    with engine.store.session() as session:
        for m in session.scalars(select(Migration).where(Migration.station_action.is_not(None))):
            kind = {"check1": "check1", "check2": "check2", "local-migrate": "done"}[
                str(m.station_action)]
            exists = session.scalars(select(StationReport).where(
                StationReport.migration_id == m.id, StationReport.kind == kind)).first()
            if exists is None:
                session.add(StationReport(
                    station=m.station or "", address=m.address, migration_id=m.id, kind=kind,
                    ok=True, detail={"mailbox_type": "mbox", "mailbox_size": 1234}))
                answered += 1
    return answered


def seed_source(engine: Engine, address: str) -> list[str]:
    """Old mail in two folders and a calendar in BOX1; returns the Message-IDs."""
    s1 = engine.drivers["s1"]
    box = mailbox_id_for(address)
    ids = []
    for n, folder in enumerate(["INBOX", "INBOX", "Sent"]):
        mid = f"<old{n}.{box}@corp.example>"
        s1.append_message(box, folder, (
            f"From: x@corp.example\nTo: {address}\nMessage-ID: {mid}\nSubject: old {n}\n\n"
            f"old body {n}\n").encode(), flags="S", internal_date=1_600_000_000.0 + n)
        ids.append(mid)
    s1.write_diary(box, (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\nBEGIN:VEVENT\r\n"
        f"UID:{box}-1\r\nDTSTAMP:20260101T000000Z\r\nDTSTART:20260102T100000Z\r\n"
        "SUMMARY:meeting\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").encode())
    return ids


MODES = list(itertools.product([False, True], ["none", "copy", "validate-and-copy", "diary-only"],
                               [False, True], [False, True]))


@pytest.mark.parametrize(("station", "transfer", "local", "delete"), MODES,
                         ids=[f"st{int(a)}-{b}-local{int(c)}-del{int(d)}" for a, b, c, d in MODES])
def test_every_mode_combination(world: World, tmp_path: Path, station: bool, transfer: str,
                                local: bool, delete: bool) -> None:
    case = f"st{int(station)}{transfer[:4]}l{int(local)}d{int(delete)}"
    address, alias = f"{case}@corp.example", f"{case}.alias@corp.example"
    box = [{"address": address, "aliases": [alias], "station": f"ws-{case}"}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", stationChecks=station, dataTransfer=transfer, localStationData=local,
                 deleteSource={"after": "0s", "consent": True} if delete else "never")

    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    engine = world.engine(home, state)
    engine.apply()
    old_ids = seed_source(engine, address)

    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])
    engine = world.engine(moved, state)
    for _ in range(12):  # bounded: each round applies, then answers the station
        engine.apply()
        if answer_station(engine) == 0 and not engine.plan().pending:
            break

    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        events = session.scalars(select(Event).where(Event.migration_id == m.id)
                                 .order_by(Event.id)).all()
        path = [(e.step, e.to_state) for e in events if e.to_state is not None
                and e.to_state != e.from_state]
        assert m.failed_reason is None, m.failed_reason
    assert path == expected_path(station, transfer, local, delete)
    assert engine.plan().pending is False

    directory = engine.fed.directory().entries
    new_box = mailbox_message_ids(engine, "s2", address)
    s1_has_box1 = engine.drivers["s1"].get_account(mailbox_id_for(address)) is not None
    if transfer == "diary-only":
        assert directory[address] == physical_address("s1", mailbox_id_for(address))
        assert not new_box  # the address did not move: no mail copied
        assert engine.drivers["s2"].read_diary(mailbox_id_for(address)) is not None
        assert s1_has_box1
        return
    assert directory[address] == physical_address("s2", mailbox_id_for(address))
    assert directory[alias] == physical_address("s2", mailbox_id_for(address))
    if transfer == "none":
        assert not new_box
    else:
        assert {mid: new_box[mid] for mid in old_ids} == dict.fromkeys(old_ids, 1)
        assert engine.drivers["s2"].read_diary(mailbox_id_for(address)) is not None
    assert s1_has_box1 is not delete
    if not delete:  # the old mailbox is redirected to the new one (E9)
        account = engine.drivers["s1"].get_account(mailbox_id_for(address))
        assert account is not None
        assert account.redirect_to == physical_address("s2", mailbox_id_for(address))
    assert engine.fed.holds() == {}


def test_the_plan_snapshot_columns_are_migration_views_fields_in_order() -> None:
    """read_migrations builds MigrationView positionally from _VIEW_COLUMNS."""
    from dataclasses import fields

    from reconciler.engine import _VIEW_COLUMNS
    from reconciler.plan import MigrationView

    assert [c.key for c in _VIEW_COLUMNS] == [f.name for f in fields(MigrationView)]
