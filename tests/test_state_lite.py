"""The SQLite state store without SQLAlchemy (`reconciler.state.lite`): the run records it
writes are the rows the model's own statements write, and it is used only for a file that
exists and is at the head revision."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from reconciler.mover.manifest import Manifest, ManifestRow, RunFigures
from reconciler.state import lite
from reconciler.state.lite import (
    MANIFEST_COLUMNS,
    SCHEMA_HEADER,
    SCHEMA_SCRIPT,
    LiteStore,
    default_url,
    head_revision,
    schema_of,
    sqlite_path,
)
from reconciler.state.model import TransferManifest, TransferRun
from reconciler.state.store import ALEMBIC_DIR, Store, at_head, open_store

AT = datetime(2026, 12, 4, 22, 15, 30, 123456, tzinfo=UTC)


def figures(mailbox: str, *, verified: bool = True, copied: int = 3) -> RunFigures:
    return RunFigures(mailbox=mailbox, phase="copy", copied=copied, present=2, failed=0,
                      missing=0, bytes_copied=4096, messages_total=5, bytes_total=9000,
                      seconds=0.25, verified=verified,
                      report={"mailbox": mailbox, "proof": "target-bytes", "folders": [
                          {"folder": "INBOX", "target": "INBOX", "messages": 5,
                           "src_state": "7/6/5", "dst_state": "9/6/5"}]})


def rows(store: Store) -> list[tuple[object, ...]]:
    with store.session() as session:
        runs = session.scalars(select(TransferRun).order_by(TransferRun.id)).all()
        return [(r.migration_id, r.mailbox, r.phase, r.copied, r.present, r.failed, r.missing,
                 r.bytes_copied, r.messages_total, r.bytes_total, r.seconds, r.verified, r.at,
                 r.report) for r in runs]


def test_a_pass_written_through_sqlite3_reads_back_as_the_one_written_through_sqlalchemy(
        tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    store = open_store(url)  # creates the file at head
    Manifest(store, 4).record_runs([figures("amy"), figures("bob", verified=False)], AT)
    lite = Manifest.at_url(url, 4)
    assert lite.lite is not None  # at head: through sqlite3
    lite.record_runs([figures("amy"), figures("bob", verified=False)], AT)
    written = rows(store)
    assert len(written) == 4
    assert written[2:] == written[:2]  # column for column, the timestamp too
    assert written[0][12] == AT
    assert lite.last_states("amy") == Manifest(store, 4).last_states("amy") == {
        "INBOX": ("7/6/5", "INBOX", "9/6/5", 5)}
    assert lite.last_states("bob") == {}  # never verified
    other = Manifest.at_url(url, 5)  # another migration of the same address: not its pass
    assert other.lite is not None
    assert other.last_states("amy") == Manifest(store, 5).last_states("amy") == {}
    other.close()
    lite.close()
    store.close()


def test_the_newest_verified_pass_is_the_one_read(tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    open_store(url).close()
    manifest = Manifest.at_url(url)
    older, newer = figures("cy"), figures("cy")
    newer.report["folders"][0]["src_state"] = "7/8/6"
    manifest.record_runs([older, newer, figures("cy", verified=False)], AT)
    assert manifest.last_states("cy")["INBOX"][0] == "7/8/6"
    manifest.close()


def test_only_a_sqlite_file_at_head_is_read_without_sqlalchemy(tmp_path: Path) -> None:
    assert LiteStore.open(default_url(tmp_path / "missing.db")) is None
    assert not (tmp_path / "missing.db").exists()  # nothing created on the way
    assert LiteStore.open("postgresql://u@127.0.0.1/db") is None
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all, just some bytes\n" * 10)
    assert LiteStore.open(default_url(junk)) is None
    empty = tmp_path / "empty.db"
    create_engine(default_url(empty)).connect().close()  # a database without the tables
    assert LiteStore.open(default_url(empty)) is None
    older = tmp_path / "older.db"
    from alembic import command
    from alembic.config import Config
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    with create_engine(default_url(older)).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
    assert LiteStore.open(default_url(older)) is None  # an older revision: upgraded first
    manifest = Manifest.at_url(default_url(older))  # ... by the ordinary way
    assert manifest.lite is not None
    manifest.close()
    with create_engine(default_url(older)).connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version != "0004"
    runs = LiteStore.open(default_url(older))  # now at head
    assert runs is not None
    runs.close()


def test_a_naive_timestamp_is_refused_as_the_model_refuses_it(tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    open_store(url).close()
    runs = LiteStore.open(url)
    assert runs is not None
    with pytest.raises(ValueError, match="naive"):
        runs.insert_runs([{"migration_id": 0}], datetime(2026, 12, 4))
    runs.close()


def test_manifest_rows_written_through_sqlite3_are_the_ones_sqlalchemy_writes(
        tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    store = open_store(url)
    given = [ManifestRow("INBOX", "a" * 64, 120, "<1@x>", True, "7", "3", "INBOX", "9", "5",
                         "b" * 64, "identical", ""),
             ManifestRow("Sent", "c" * 64, 99, "", False, "8", "4", "Sent/Old", None, None)]
    Manifest(store, 2).add("eve", given, AT)
    lite = Manifest.at_url(url, 2)
    assert lite.lite is not None
    lite.add("eve", given, AT)
    with store.session() as session:
        written = [tuple(getattr(r, c) for c in (*MANIFEST_COLUMNS, "at")) for r in
                   session.scalars(select(TransferManifest).order_by(TransferManifest.id))]
    assert len(written) == 4 and written[2:] == written[:2] and written[0][-1] == AT
    for folder in ("INBOX", "Sent"):
        both = lite.load("eve", folder)
        assert both == Manifest(store, 2).load("eve", folder) and len(both) == 2
    assert both[0] == given[1]  # read back as it was given
    assert lite.copied_count("eve") == Manifest(store, 2).copied_count("eve") == 2
    other = Manifest.at_url(url, 3)  # another migration of the same address: not its rows
    assert other.lite is not None
    assert other.load("eve", "INBOX") == Manifest(store, 3).load("eve", "INBOX") == []
    assert other.copied_count("eve") == Manifest(store, 3).copied_count("eve") == 0
    other.close()
    lite.close()
    store.close()


def test_a_manifest_never_imports_sqlalchemy_for_a_sqlite_file_new_or_at_head(
        tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    code = (
        "import sys\n"
        "from reconciler.mover.manifest import Manifest, ManifestRow\n"
        f"m = Manifest.at_url({url!r})\n"
        "print('sqlalchemy' in sys.modules)\n"
        "m.last_states('dee')\n"
        "m.add('dee', [ManifestRow('INBOX', 'f' * 64, 1, '', True, '1', '1', 'INBOX', '2', '1')])\n"
        "print(len(m.load('dee', 'INBOX')), 'sqlalchemy' in sys.modules)\n"
        "m.close()\n")

    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True).stdout.split()

    assert run() == ["False", "1", "False"]  # a new file: made from schema.sql
    assert run() == ["False", "2", "False"]  # at head: read and appended through sqlite3


def schema_rows(path: Path) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    try:
        return [*connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                    "ORDER BY rowid"),
                *connection.execute("SELECT version_num FROM alembic_version"),
                *connection.execute("PRAGMA journal_mode")]
    finally:
        connection.close()


def test_a_store_made_from_the_schema_script_is_the_one_the_migrations_make(
        tmp_path: Path) -> None:
    by_alembic, by_script = tmp_path / "alembic.db", tmp_path / "script.db"
    open_store(default_url(by_alembic)).close()
    made = LiteStore.create(default_url(by_script))
    assert made is not None
    made.close()
    assert schema_rows(by_script) == schema_rows(by_alembic)
    assert schema_rows(by_script)[-1] == ("wal",)
    connection = sqlite3.connect(by_alembic)
    try:  # the committed script is the head's: else regenerate it (`write_schema_script`)
        assert schema_of(connection) == SCHEMA_SCRIPT.read_text()
    finally:
        connection.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "script" in p.name) == ["script.db"]
    store = open_store(default_url(by_script))  # the model's way in finds it at head
    try:
        assert at_head(store.engine)
    finally:
        store.close()


def test_a_new_store_is_made_by_alembic_when_the_script_is_behind_and_an_existing_file_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"someone's file\n")
    assert LiteStore.create(default_url(existing)) is None
    assert existing.read_bytes() == b"someone's file\n"
    assert LiteStore.create(default_url(tmp_path / "no-such-folder" / "s.db")) is None
    assert not (tmp_path / "no-such-folder").exists()
    behind = tmp_path / "behind.sql"  # a migration added, the script not regenerated
    behind.write_text(SCHEMA_SCRIPT.read_text().replace(
        SCHEMA_HEADER.format(revision=head_revision()), SCHEMA_HEADER.format(revision="0001"),
        1))
    monkeypatch.setattr(lite, "SCHEMA_SCRIPT", behind)
    new = tmp_path / "new.db"
    assert LiteStore.create(default_url(new)) is None and not new.exists()
    manifest = Manifest.at_url(default_url(new))  # so the ordinary way makes it
    try:
        assert manifest.lite is not None
    finally:
        manifest.close()
    reference = tmp_path / "reference.db"
    open_store(default_url(reference)).close()
    assert schema_rows(new) == schema_rows(reference)
    assert schema_rows(new)[-2] == (head_revision(),)
