"""The station API over real HTTP: enrolment, task, authorisation, reports, local messages."""

from __future__ import annotations

import base64
import hashlib

from sqlalchemy import select

from reconciler.api.stations import enrol_station
from reconciler.state.model import Migration, Station

from stationkit import (
    ADDR,
    BOX,
    OTHER_ADDR,
    OTHER_STATION,
    STATION,
    World,
    add_migration,
    http,
    reports,
    set_action,
    world,
)

__all__ = ["world"]  # the fixture, imported for pytest

MESSAGE = b"From: a@x.example\r\nSubject: local\r\nMessage-ID: <l1@x.example>\r\n\r\nhi\r\n"


def _url(w: World, station: str, tail: str) -> str:
    return f"{w.api}/v1/stations/{station}/{tail}"


def test_enrol_and_task(world: World) -> None:
    token = world.tokens[STATION]
    status, body = http("GET", _url(world, STATION, "task"), token)
    assert status == 200
    assert body == {"station": STATION, "address": ADDR, "migration": None}

    old = add_migration(world.store, action=None, state=13)
    with world.store.session() as session:  # an old, purged migration is never served
        session.get_one(Migration, old).purged = True
    mid = add_migration(world.store, action="check1")
    status, body = http("GET", _url(world, STATION, "task"), token)
    assert status == 200
    migration = body["migration"]
    assert migration["id"] == mid
    assert migration["action"] == "check1" and migration["state"] == 1
    assert migration["failed"] is False
    assert migration["target_system"] == "s2" and migration["target_mailbox"] == BOX
    assert migration["action_since"] is not None
    assert migration["target"] == {"submission": world.accepting, "mailbox_type": "maildir"}

    with world.store.session() as session:
        row = session.get(Station, STATION)
        assert row is not None and row.last_seen is not None
        assert row.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
        assert token not in str(session.scalars(select(Station.token_sha256)).all())

    # Re-enrolment replaces the token: the old one stops working.
    new = enrol_station(world.store, STATION, ADDR)
    assert new != token
    assert http("GET", _url(world, STATION, "task"), token)[0] == 401
    assert http("GET", _url(world, STATION, "task"), new)[0] == 200


def test_a_station_acts_on_its_own_mailbox_only(world: World) -> None:
    mine = world.tokens[STATION]
    theirs_mid = add_migration(world.store, address=OTHER_ADDR, action="local-migrate")
    report = {"report_id": "r-1", "migration_id": None, "kind": "check1", "ok": True}
    # My token on another station's routes: forbidden.
    for method, tail, body in (("GET", "task", None), ("POST", "reports", report),
                               ("POST", "messages", {"folder": "X", "data": "aGk="})):
        status, answer = http(method, _url(world, OTHER_STATION, tail), mine, body)
        assert status == 403, (tail, answer)
        assert "error" in answer
    # My own route, but another address's migration: forbidden too.
    status, answer = http("POST", _url(world, STATION, "reports"), mine,
                          {**report, "migration_id": theirs_mid})
    assert status == 403 and "not a migration of" in answer["error"]
    # No token, a wrong token, a wrong scheme: unauthenticated.
    assert http("GET", _url(world, STATION, "task"))[0] == 401
    assert http("GET", _url(world, STATION, "task"), "not-a-token")[0] == 401
    assert reports(world.store) == []


def test_reports_are_idempotent_and_validated(world: World) -> None:
    token = world.tokens[STATION]
    mid = add_migration(world.store, action="check2")
    report = {"report_id": "7f0c2a8e-5b1d-4e0e-9a57-1c1f5b0d2b11", "migration_id": mid,
              "kind": "check2", "ok": True,
              "detail": {"mailbox_type": "mbox", "mailbox_size": 1234}}
    assert http("POST", _url(world, STATION, "reports"), token, report)[0] == 201
    status, body = http("POST", _url(world, STATION, "reports"), token, report)
    assert status == 200 and body["stored"] is False
    stored = reports(world.store)
    assert len(stored) == 1
    assert (stored[0].station, stored[0].address, stored[0].migration_id) == (STATION, ADDR, mid)
    assert stored[0].detail == {"mailbox_type": "mbox", "mailbox_size": 1234}

    for bad in ({**report, "report_id": "r2", "kind": "reboot"},
                {**report, "report_id": "r3", "ok": "yes"},
                {**report, "report_id": "r4", "migration_id": "12"},
                {**report, "report_id": "r5", "detail": [1]},
                {**report, "report_id": ""},
                [report]):
        status, body = http("POST", _url(world, STATION, "reports"), token, bad)
        assert status == 400, bad
        assert body["error"]
    status, body = http("POST", _url(world, STATION, "reports"), token, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]
    # The same report_id from another station is not "already stored" for it.
    status, _ = http("POST", _url(world, OTHER_STATION, "reports"),
                     world.tokens[OTHER_STATION], {**report, "migration_id": None})
    assert status == 409
    assert len(reports(world.store)) == 1


def test_messages_only_while_local_migrate_and_once(world: World) -> None:
    token = world.tokens[STATION]
    url = _url(world, STATION, "messages")
    body = {"folder": "Local Folders/Archive", "flags": "S", "internal_date": 1_600_000_000.0,
            "data": base64.b64encode(MESSAGE).decode()}
    # No migration at all, then a migration whose action is a check: refused.
    assert http("POST", url, token, body)[0] == 409
    mid = add_migration(world.store, action="check1")
    status, answer = http("POST", url, token, body)
    assert status == 409 and "does not expect local data" in answer["error"]
    assert "Local Folders/Archive" not in world.driver.list_folders(BOX)

    set_action(world.store, mid, "local-migrate")
    status, answer = http("POST", url, token, body)
    assert status == 201 and answer["present"] is False
    status, answer = http("POST", url, token, body)
    assert status == 200 and answer["present"] is True
    stored = world.driver.list_messages(BOX, "Local Folders/Archive")
    assert len(stored) == 1
    assert world.driver.read_message(BOX, "Local Folders/Archive", stored[0].key) == MESSAGE
    assert stored[0].flags == "S" and stored[0].internal_date == 1_600_000_000.0

    for bad in ({**body, "data": "!!!"}, {**body, "folder": "../escape"},
                {**body, "folder": ""}, {**body, "flags": "Z"},
                {**body, "internal_date": "yesterday"}):
        assert http("POST", url, token, bad)[0] == 400, bad

    set_action(world.store, mid, None)
    assert http("POST", url, token, body)[0] == 409


def test_openapi_describes_the_routes(world: World) -> None:
    status, doc = http("GET", f"{world.api}/v1/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/openapi.json", "/v1/stations/{name}/task",
                                 "/v1/stations/{name}/reports",
                                 "/v1/stations/{name}/messages"}
    assert "409" in doc["paths"]["/v1/stations/{name}/messages"]["post"]["responses"]
    status, answer = http("GET", f"{world.api}/v1/nowhere")
    assert status == 404 and "error" in answer


def test_report_bodies_and_details_are_bounded(world: World) -> None:
    """A 55 MB detail used to be stored as is (the state store grew 640x): now 413."""
    import http.client as httpc
    import json
    import urllib.parse

    from reconciler.api.stations import MAX_DETAIL_BYTES, MAX_REPORT_BYTES

    token = world.tokens[STATION]
    url = _url(world, STATION, "reports")
    big_detail = {"report_id": "big-1", "migration_id": None, "kind": "check1", "ok": True,
                  "detail": {"log": "x" * (MAX_DETAIL_BYTES + 1)}}
    status, body = http("POST", url, token, big_detail)
    assert status == 413 and body["error"].startswith("detail is 262,") \
        and "at most 262,144" in body["error"], body
    padded = {**big_detail, "report_id": "big-2", "detail": {}, "pad": "x" * MAX_REPORT_BYTES}
    status, body = http("POST", url, token, padded)
    assert status == 413 and body["error"] == "request body larger than 1,048,576 bytes", body

    # Chunked, without a Content-Length: refused while reading, not after.
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    conn = httpc.HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunks = (json.dumps(padded).encode()[i:i + 65536] for i in range(0, 2 * MAX_REPORT_BYTES,
                                                                      65536))
    conn.request("POST", parts.path, body=chunks, encode_chunked=True, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    answer = conn.getresponse()
    assert answer.status == 413, answer.read()
    conn.close()

    assert reports(world.store) == []
    ok = {**big_detail, "report_id": "ok-1", "detail": {"folders": ["INBOX"] * 1000}}
    assert http("POST", url, token, ok)[0] == 201
    assert [r.report_id for r in reports(world.store)] == ["ok-1"]


def test_an_address_enrolled_for_another_station_is_refused_unless_moved(world: World) -> None:
    import pytest

    from reconciler.api.stations import AddressTaken

    with pytest.raises(AddressTaken, match=f"^{OTHER_ADDR} is already enrolled for station "
                       f"{OTHER_STATION}; to move it to ws-new, enrol again with --move"):
        enrol_station(world.store, "ws-new", OTHER_ADDR)
    with world.store.session() as session:
        assert session.get(Station, "ws-new") is None
    assert http("GET", _url(world, OTHER_STATION, "task"), world.tokens[OTHER_STATION])[0] == 200

    token = enrol_station(world.store, "ws-new", OTHER_ADDR, move=True)
    assert http("GET", _url(world, OTHER_STATION, "task"), world.tokens[OTHER_STATION])[0] == 401
    status, body = http("GET", _url(world, "ws-new", "task"), token)
    assert status == 200 and body["address"] == OTHER_ADDR
    # Re-enrolling a station for its own address is not a conflict.
    assert enrol_station(world.store, "ws-new", OTHER_ADDR)


def test_cli_enrol_refuses_a_taken_address(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from world import run_cli

    state = str(tmp_path / "state.db")
    first = run_cli("--state", state, "station", "enrol", "ws-a", "--address", "b@x.example",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("--state", state, "station", "enrol", "ws-b", "--address", "B@x.example",
                    cwd=tmp_path)
    assert again.returncode == 1 and again.stdout == "", again
    assert again.stderr.strip() == ("error: station enrol ws-b: b@x.example is already enrolled "
                                    "for station ws-a; to move it to ws-b, enrol again with "
                                    "--move (that station's token stops working)")
    moved = run_cli("--state", state, "station", "enrol", "ws-b", "--address", "b@x.example",
                    "--move", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
