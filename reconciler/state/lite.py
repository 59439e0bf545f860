"""A SQLite state store read and appended without SQLAlchemy: its revision, and the data
mover's two tables (the manifest and the run records).

Why a second way into the store: a `mover copy` in a new process that finds nothing
changed needs two things from the store, the last verified pass's report of each mailbox
(to skip every unchanged folder) and one row per pass afterwards. Importing SQLAlchemy and
the state model for them was 0.23 s of a 0.35 s import, as much again as the whole no-op
pass's logins (issue 22); and a copy of 10,000 messages spent 0.2-0.3 CPU-s in SQLAlchemy's
statement machinery writing its manifest rows (py-spy), for one `executemany` each flush.
So for a SQLite file at the head revision the mover's command line reads and appends those
two tables through the standard library's `sqlite3`, on the same tables and columns as the
model (`tests/test_state_lite.py` writes rows both ways and reads both back through
SQLAlchemy); a new file or an older revision is created or upgraded by `store.py` first,
and PostgreSQL and the reconciler's steps (a step's transaction) go through SQLAlchemy as
before. Nothing here upgrades a schema, nor updates or deletes a row.

A new SQLite file is made from `schema.sql`, the head revision's schema as Alembic leaves
it (its CREATE statements and version row, dumped from a store Alembic made: `schema_of`),
when that script is at the scripts' head: importing SQLAlchemy and Alembic to run the
migrations was 0.38 s of every first `mover copy` into a new store, a tenth of a 10,000-
message copy (issue 22). `tests/test_state_lite.py` makes a store both ways and compares
their schemas; a script behind the head is not used (Alembic creates the file instead).

The head revision is read from the migration scripts' text (no Alembic), here so that both
this module and `store.py` use the one reader.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailferry.fsutil import fsync_path

# The package data beside this module: an unpacked install, as pip makes it, so Alembic
# gets the real folder it needs (importlib.resources would give the same folder here, at
# 5 ms of every `mover copy` process's start: issue 22).
ALEMBIC_DIR = Path(__file__).resolve().parent / "alembic"

# The head revision's schema (see the module's doc); its first line names the revision.
SCHEMA_SCRIPT = Path(__file__).resolve().parent / "schema.sql"
SCHEMA_HEADER = "-- The state store's schema at revision {revision}"

_REVISION = re.compile(r"^(down_)?revision\s*=\s*(.*)$", re.MULTILINE)

# The columns the mover writes (id and at aside), in the model's names: `model.TransferRun`,
# `model.TransferManifest`.
MANIFEST_COLUMNS = ("migration_id", "mailbox", "folder", "sha256", "size", "message_id",
                    "copied", "src_validity", "src_uid", "dst_folder", "dst_validity",
                    "dst_uid", "dst_sha256", "proof", "proof_note")
# What `load` reads back, in `ManifestRow`'s order.
MANIFEST_READ = ("folder", "sha256", "size", "message_id", "copied", "src_validity",
                 "src_uid", "dst_folder", "dst_validity", "dst_uid", "dst_sha256", "proof",
                 "proof_note")
RUN_COLUMNS = ("migration_id", "mailbox", "phase", "copied", "present", "failed", "missing",
               "bytes_copied", "messages_total", "bytes_total", "seconds", "verified",
               "report")


def default_url(path: str | Path = "mailferry-state.db") -> str:
    """The SQLite URL of a state file."""
    return f"sqlite:///{Path(path).resolve()}"


def head_revision() -> str | None:
    """The single head of the migration scripts, read from their text without importing
    Alembic (None when there is not exactly one or a file does not parse simply)."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for script in (ALEMBIC_DIR / "versions").glob("*.py"):
        found = {bool(m.group(1)): m.group(2) for m in _REVISION.finditer(script.read_text())}
        if False not in found or True not in found:
            return None
        revisions.update(re.findall(r"['\"]([^'\"]+)['\"]", found[False]))
        downs.update(re.findall(r"['\"]([^'\"]+)['\"]", found[True]))
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL (None: another database, or in memory)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or "?" in url:
        return None
    path = url[len(prefix):]
    return Path(path) if path and path != ":memory:" else None


def _stamp(at: datetime) -> str:
    """A datetime as SQLAlchemy's SQLite DateTime stores `model.UTCDateTime` (naive UTC)."""
    if at.tzinfo is None:
        raise ValueError("naive datetime given to the state store")
    return at.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


class LiteStore:
    """The mover's tables of a SQLite store at the head revision, through `sqlite3`.

    `LiteStore.open(url)` is None unless the file exists and its `alembic_version` is the
    scripts' head: then the tables are exactly the model's, and nothing needs creating.
    Each `insert_*` is one transaction (one commit: an fsync, `synchronous=FULL`)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    @classmethod
    def open(cls, url: str) -> LiteStore | None:
        path = sqlite_path(url)
        if path is None or not path.is_file():
            return None
        head = head_revision()
        return None if head is None else cls._at(path, head)

    @classmethod
    def _at(cls, path: Path, head: str) -> LiteStore | None:
        """The store in the file at `path` if it is at revision `head`."""
        try:
            connection = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        except sqlite3.Error:
            return None
        try:
            # The store's own settings (`store._sqlite_pragmas`): WAL is the file's already.
            connection.execute("PRAGMA busy_timeout=10000")
            connection.execute("PRAGMA synchronous=FULL")
            versions = {r[0] for r in connection.execute("SELECT version_num FROM alembic_version")}
        except sqlite3.Error:
            connection.close()
            return None  # not a store at all, or locked: the ordinary way says why
        if versions != {head}:
            connection.close()
            return None
        return cls(connection)

    @classmethod
    def create(cls, url: str) -> LiteStore | None:
        """A new store at `url` made from `schema.sql`, opened; None when `url` is not a
        plain SQLite file, the file exists, its folder cannot take it, or the script is
        not at the scripts' head (`store.open_store` then creates it, or says why not).

        Made under a temporary name beside it, synced, then linked to its name, which fails
        if another process made the store meanwhile (that one is opened): no half-made
        file is ever under the name, and none is overwritten."""
        path = sqlite_path(url)
        head = head_revision()
        if path is None or head is None or path.exists():
            return None
        try:
            script = SCHEMA_SCRIPT.read_text()
        except OSError:
            return None
        if script.partition("\n")[0] != SCHEMA_HEADER.format(revision=head):
            return None
        new = path.with_name(f".{path.name}.{os.getpid()}.new")
        try:
            connection = sqlite3.connect(new, isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL")  # the store's, kept in the file
                connection.executescript(f"BEGIN;\n{script}\nCOMMIT;")
            finally:
                connection.close()  # the last connection: the WAL is checkpointed, removed
            fsync_path(new)
            with contextlib.suppress(FileExistsError):
                os.link(new, path)
            fsync_path(path.parent)
        except (OSError, sqlite3.Error):
            return None
        finally:
            for leftover in (new, new.with_name(new.name + "-wal"),
                             new.with_name(new.name + "-shm")):
                leftover.unlink(missing_ok=True)
        return cls._at(path, head)

    def last_verified_report(self, migration_id: int, mailbox: str) -> str | None:
        """The report (JSON text) of the newest verified pass over `mailbox` in a
        migration, or None."""
        row = self.connection.execute(
            "SELECT report FROM transfer_runs WHERE migration_id = ? AND mailbox = ? "
            "AND verified = 1 ORDER BY id DESC LIMIT 1", (migration_id, mailbox)).fetchone()
        return None if row is None else row[0]

    def manifest_rows(self, migration_id: int, mailbox: str, folder: str
                      ) -> list[tuple[Any, ...]]:
        """The manifest rows of a job's source folder in a migration, oldest first
        (`MANIFEST_READ`)."""
        return self.connection.execute(
            f"SELECT {', '.join(MANIFEST_READ)} FROM transfer_manifest "
            "WHERE migration_id = ? AND mailbox = ? AND folder = ? ORDER BY id",
            (migration_id, mailbox, folder)).fetchall()

    def copied_count(self, migration_id: int, mailbox: str) -> int:
        row = self.connection.execute(
            "SELECT count(*) FROM transfer_manifest WHERE migration_id = ? AND mailbox = ? "
            "AND copied = 1", (migration_id, mailbox)).fetchone()
        return int(row[0])

    def insert_manifest(self, rows: Iterable[Mapping[str, Any]], at: datetime) -> None:
        """Append manifest rows (values by `MANIFEST_COLUMNS`) in one transaction."""
        self._insert("transfer_manifest", MANIFEST_COLUMNS, rows, at, ("copied",))

    def insert_runs(self, runs: Iterable[Mapping[str, Any]], at: datetime) -> None:
        """Append run rows (values by `RUN_COLUMNS`) in one transaction."""
        self._insert("transfer_runs", RUN_COLUMNS, runs, at, ("verified",))

    def _insert(self, table: str, columns: tuple[str, ...], rows: Iterable[Mapping[str, Any]],
                at: datetime, booleans: tuple[str, ...]) -> None:
        stamp = _stamp(at)
        values = [(*(int(r[c]) if c in booleans else r[c] for c in columns), stamp)
                  for r in rows]
        if not values:
            return
        marks = ", ".join("?" * (len(columns) + 1))
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            self.connection.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}, at) VALUES ({marks})", values)
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def close(self) -> None:
        self.connection.close()


def schema_of(connection: sqlite3.Connection) -> str:
    """The schema script of an open store: the header naming its revision, every CREATE
    statement of `sqlite_master` in the order the file holds them, and the version row."""
    versions = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    if len(versions) != 1:
        raise ValueError(f"a store at one revision expected, found {versions}")
    statements = [row[0] for row in connection.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rowid")]
    lines = [SCHEMA_HEADER.format(revision=versions[0]),
             "-- Written by reconciler.state.lite.write_schema_script from a store Alembic made;",
             "-- tests/test_state_lite.py fails when it differs from what the migrations make.",
             *(f"{statement};" for statement in statements),
             f"INSERT INTO alembic_version (version_num) VALUES ('{versions[0]}');"]
    return "\n".join(lines) + "\n"


def write_schema_script(target: Path = SCHEMA_SCRIPT) -> None:
    """Make a store through Alembic in a temporary folder and write its `schema_of` to
    `target` (after a new migration: `python -c 'from reconciler.state.lite import
    write_schema_script; write_schema_script()'`)."""
    import tempfile

    from reconciler.state.store import open_store

    with tempfile.TemporaryDirectory() as folder:
        store_path = Path(folder) / "state.db"
        open_store(f"sqlite:///{store_path}").close()
        connection = sqlite3.connect(store_path)
        try:
            target.write_text(schema_of(connection))
        finally:
            connection.close()
