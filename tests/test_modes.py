"""A migration's modes: typed once, stored as the same JSON as ever, old rows still read.

The stored form is a contract with every state store already written: E1 wrote the policy's
modes as a JSON object (the keys below, in this order, `maxParallel` last); rows written by
older versions lack keys, newer ones may carry keys this version does not know.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select, text

from reconciler.engine import read_migrations
from reconciler.spec.model import PolicySpec
from reconciler.spec.modes import Modes, modes_from_text
from reconciler.state.model import Migration
from reconciler.state.store import Store, default_url

NOW = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)

# What E1 recorded before the modes were typed: PolicySpec.modes()'s dict, then maxParallel.
WRITTEN_BEFORE = {
    "policy": "wave", "stationChecks": True, "dataTransfer": "validate-and-copy",
    "diary": False, "localStationData": True, "deleteSourceAfter": 172800.0,
    "prestageLead": 259200.0, "recheckLead": 3600.0, "retention": 2592000.0,
    "stationRetries": 5, "folderMap": [{"from": "INBOX.Sent", "to": "Sent"}],
    "throttle": {"messagesPerSecond": 50.0, "bytesPerSecond": 2000000.0},
    "prestageCopy": True, "verify": "deep",
    "acceptStoreRewrites": [{"system": "s2", "rewrite": "crlf"}], "maxParallel": 4,
}

POLICY = PolicySpec(
    "wave", station_checks=True, data_transfer="validate-and-copy", diary=False,
    local_station_data=True, delete_source_after=timedelta(days=2), station_retries=5,
    folder_map=(("INBOX.Sent", "Sent"),), throttle_messages_per_second=50.0,
    throttle_bytes_per_second=2_000_000.0, prestage_copy=True, verify="deep",
    accept_store_rewrites=(("s2", "crlf"),), max_parallel=4)


def test_the_policy_is_stored_as_the_same_json_object_key_for_key_in_order() -> None:
    stored = POLICY.modes().to_json()
    assert list(stored) == list(WRITTEN_BEFORE)
    assert json.dumps(stored) == json.dumps(WRITTEN_BEFORE)


def test_what_was_stored_reads_back_as_the_policy_recorded_it() -> None:
    modes = Modes.from_json(WRITTEN_BEFORE)
    assert modes == POLICY.modes()
    assert modes.prestage_lead == timedelta(days=3) and modes.retention == timedelta(days=30)
    assert modes.accepted_rewrites("s2") == {"crlf"} and modes.accepted_rewrites("s1") == set()
    assert (modes.copies_mail, modes.diary_only, modes.ends_at_10) == (True, False, False)


def test_an_old_row_takes_the_defaults_a_missing_key_always_had() -> None:
    old = {"policy": "bench", "dataTransfer": "copy", "deleteSourceAfter": None}
    modes = Modes.from_json(old)
    assert modes == Modes(policy="bench")
    assert modes.max_parallel == 10 and modes.diary and not modes.station_checks
    assert modes.ends_at_10  # deleteSourceAfter null: delete never
    assert modes.retention == timedelta(0) and modes.prestage_lead == timedelta(0)
    assert Modes.from_json({}) == Modes() and Modes.from_json(None) == Modes()


def test_unknown_keys_and_malformed_values_do_not_stop_the_reconciler() -> None:
    newer = {**WRITTEN_BEFORE, "somethingNew": {"x": 1}, "dataTransfer": "teleport",
             "folderMap": [{"from": "A"}, "junk", {"from": "B", "to": "C"}],
             "throttle": "fast", "acceptStoreRewrites": {"not": "a list"}}
    modes = Modes.from_json(newer)
    assert modes.data_transfer == "copy"  # an unknown transfer reads as the default
    assert modes.folder_map == (("B", "C"),)
    assert modes.throttle_messages_per_second == 0.0 and modes.accept_store_rewrites == ()
    assert modes_from_text("not json") == Modes() and modes_from_text(None) == Modes()


def _store(tmp_path: Path) -> Store:
    return Store(default_url(tmp_path / "state.db"))


def _row(address: str, mid: int) -> dict[str, object]:
    return {"id": mid, "address": address, "aliases": "[]", "source_system": "s1",
            "target_system": "s2", "source_mailbox": address, "target_mailbox": address,
            "placement": "p", "state": 4, "state_since": NOW.replace(tzinfo=None),
            "attempts": 0, "suspended": False, "purged": False,
            "created_at": NOW.replace(tzinfo=None)}


def test_rows_written_as_json_text_read_through_the_orm_and_the_plan_snapshot(
        tmp_path: Path) -> None:
    store = _store(tmp_path)
    old = '{"policy": "old", "dataTransfer": "diary-only", "unknownKey": [1, 2]}'
    with store.engine.begin() as conn:  # as an older version wrote them: raw JSON text
        for mid, (address, modes) in enumerate(
                [("a@corp.example", json.dumps(WRITTEN_BEFORE)), ("b@corp.example", old),
                 ("c@corp.example", json.dumps(WRITTEN_BEFORE))], start=1):
            conn.execute(text(
                "INSERT INTO migrations (id, address, aliases, source_system, target_system,"
                " source_mailbox, target_mailbox, placement, modes, state, state_since,"
                " attempts, suspended, purged, created_at) VALUES (:id, :address, :aliases,"
                " :source_system, :target_system, :source_mailbox, :target_mailbox,"
                " :placement, :modes, :state, :state_since, :attempts, :suspended, :purged,"
                " :created_at)"), {**_row(address, mid), "modes": modes})
    with store.session() as session:
        rows = session.scalars(select(Migration).order_by(Migration.id)).all()
        assert [r.modes for r in rows] == [POLICY.modes(), Modes(policy="old",
                                           data_transfer="diary-only"), POLICY.modes()]
    views = read_migrations(store)
    assert [v.modes for v in views] == [r.modes for r in rows]
    assert views[0].modes is views[2].modes  # one Modes per distinct text, shared by its rows
    store.close()


def test_a_row_written_now_stores_the_json_object_and_loads_unchanged(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with store.engine.begin() as conn:
        conn.execute(insert(Migration), [{**_row("a@corp.example", 1), "aliases": [],
                                          "state_since": NOW, "created_at": NOW,
                                          "modes": POLICY.modes()}])
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT modes FROM migrations")).scalar_one()
    assert json.loads(raw) == WRITTEN_BEFORE
    with store.session() as session:
        m = session.scalars(select(Migration)).one()
        m.state = 5  # an unrelated change does not rewrite the modes
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT modes FROM migrations")).scalar_one() == raw
    store.close()
