"""The state store on a real PostgreSQL: Alembic creates the schema, and a whole migration
runs through every step with its transitions and events recorded there."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.engine import read_migrations
from reconciler.state.model import Event, Migration
from reconciler.state.store import open_store

from pgutil import PrivatePostgres
from test_engine_modes import seed_source
from test_modes import POLICY, WRITTEN_BEFORE
from world import World, mailbox_message_ids, placement, policy

pytestmark = pytest.mark.timeout(180)


def test_schema_is_created_by_alembic(postgres: PrivatePostgres) -> None:
    store = open_store(postgres.url)
    tables = set(inspect(store.engine).get_table_names())
    assert {"migrations", "events", "stations", "station_reports", "transfer_manifest",
            "transfer_runs", "alembic_version"} <= tables
    open_store(postgres.url).close()  # a second open finds head and changes nothing
    store.close()


def test_a_migration_runs_with_its_state_in_postgres(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    address = "pg@corp.example"
    box = [{"address": address, "aliases": ["pg.alias@corp.example"]}]
    home = world.write(tmp_path / "v1", [policy("p"), placement("home", "s1", box,
                                                                policy_name="p")])
    engine = world.engine(home, postgres.url)
    engine.apply()
    old_ids = seed_source(engine, address)
    moved = world.write(tmp_path / "v2", [policy("p"), placement("wave", "s2", box,
                                                                 policy_name="p")])
    engine = world.engine(moved, postgres.url)
    report = engine.apply()
    assert report.errors == []
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.state == 13 and m.hold_started_at is not None
        assert m.hold_started_at.tzinfo is not None  # UTC round trip on PostgreSQL
        steps = [e.step for e in session.scalars(
            select(Event).where(Event.migration_id == m.id).order_by(Event.id))]
    assert steps == ["E1", "E2", "E4", "E5-E8", "E9", "E11-E14", "E15", "E40", "E41-E42"]
    found = mailbox_message_ids(engine, "s2", address)
    assert all(found[mid] == 1 for mid in old_ids)
    assert engine.fed.lookup(address) == physical_address("s2", mailbox_id_for(address))


def test_modes_are_stored_as_json_and_read_back_typed_on_postgres(
        postgres: PrivatePostgres) -> None:
    """PostgreSQL's json column, read whole (the ORM) and as text (the plan's snapshot)."""
    store = open_store(postgres.url)
    address = "modes@corp.example"
    with store.session() as session:
        session.add(Migration(address=address, aliases=[], source_system="s1",
                              target_system="s2", source_mailbox="m", target_mailbox="m",
                              placement="p", modes=POLICY.modes(), state=4))
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT modes FROM migrations WHERE address = :a"),
                           {"a": address}).scalar_one()
    assert raw == WRITTEN_BEFORE  # psycopg decodes json: the object E1 always wrote
    with store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.modes == POLICY.modes()
    views = [v for v in read_migrations(store) if v.address == address]
    assert [v.modes for v in views] == [POLICY.modes()]
    store.close()
