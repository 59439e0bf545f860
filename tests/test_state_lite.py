"""The SQLite state store without SQLAlchemy (`reconciler.state.lite`): the run records it
writes are the rows the model's own statements write, and it is used only for a file that
exists and is at the head revision."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from reconciler.mover.manifest import Manifest, RunFigures
from reconciler.state.lite import LiteRuns, default_url, sqlite_path
from reconciler.state.model import TransferRun
from reconciler.state.store import ALEMBIC_DIR, Store, open_store

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
    assert lite.runs is not None  # at head: through sqlite3
    lite.record_runs([figures("amy"), figures("bob", verified=False)], AT)
    written = rows(store)
    assert len(written) == 4
    assert written[2:] == written[:2]  # column for column, the timestamp too
    assert written[0][12] == AT
    assert lite.last_states("amy") == Manifest(store).last_states("amy") == {
        "INBOX": ("7/6/5", "INBOX", "9/6/5", 5)}
    assert lite.last_states("bob") == {}  # never verified
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
    assert LiteRuns.open(default_url(tmp_path / "missing.db")) is None
    assert not (tmp_path / "missing.db").exists()  # nothing created on the way
    assert LiteRuns.open("postgresql://u@127.0.0.1/db") is None
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all, just some bytes\n" * 10)
    assert LiteRuns.open(default_url(junk)) is None
    empty = tmp_path / "empty.db"
    create_engine(default_url(empty)).connect().close()  # a database without the tables
    assert LiteRuns.open(default_url(empty)) is None
    older = tmp_path / "older.db"
    from alembic import command
    from alembic.config import Config
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    with create_engine(default_url(older)).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
    assert LiteRuns.open(default_url(older)) is None  # an older revision: upgraded first
    manifest = Manifest.at_url(default_url(older))  # ... by the ordinary way
    assert manifest.runs is None
    manifest.close()
    with create_engine(default_url(older)).connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version != "0004"
    runs = LiteRuns.open(default_url(older))  # now at head
    assert runs is not None
    runs.close()


def test_a_naive_timestamp_is_refused_as_the_model_refuses_it(tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    open_store(url).close()
    runs = LiteRuns.open(url)
    assert runs is not None
    with pytest.raises(ValueError, match="naive"):
        runs.insert([{"migration_id": 0}], datetime(2026, 12, 4))
    runs.close()


def test_a_manifest_at_head_imports_no_sqlalchemy_until_it_needs_the_rows(
        tmp_path: Path) -> None:
    url = default_url(tmp_path / "state.db")
    open_store(url).close()
    code = (
        "import sys\n"
        "from reconciler.mover.manifest import Manifest\n"
        f"m = Manifest.at_url({url!r})\n"
        "m.last_states('dee')\n"
        "print('sqlalchemy' in sys.modules)\n"
        "m.load('dee', 'INBOX')\n"
        "print('sqlalchemy' in sys.modules)\n"
        "m.close()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"], done.stderr
