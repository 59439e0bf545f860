"""A SQLite state store read and appended without SQLAlchemy: its revision, and the data
mover's run records.

Why a second way into the store: a `mover copy` in a new process that finds nothing
changed needs two things from the store, the last verified pass's report of each mailbox
(to skip every unchanged folder) and one row per pass afterwards. Importing SQLAlchemy and
the state model for them was 0.23 s of a 0.35 s import, as much again as the whole no-op
pass's logins (issue 22). So for a SQLite file that exists and is at the head revision,
those two go through the standard library's `sqlite3`, on the same tables and columns as
the model (`tests/test_state_lite.py` writes a pass both ways and reads both back through
SQLAlchemy); anything else (a new file, an older revision, PostgreSQL, the manifest's
rows) goes through `store.py` as before. Nothing here creates or upgrades a schema.

The head revision is read from the migration scripts' text (no Alembic), here so that both
this module and `store.py` use the one reader.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

# Package data read through importlib.resources; an unpacked install, as pip makes it, so
# Alembic gets the real folder it needs.
ALEMBIC_DIR = Path(str(resources.files("reconciler.state") / "alembic"))

_REVISION = re.compile(r"^(down_)?revision\s*=\s*(.*)$", re.MULTILINE)

# The columns of `model.TransferRun` a pass writes (id and at aside), in the model's names.
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


class LiteRuns:
    """The run records of a SQLite store at the head revision, through `sqlite3`.

    `LiteRuns.open(url)` is None unless the file exists and its `alembic_version` is the
    scripts' head: then the tables are exactly the model's, and nothing needs creating."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    @classmethod
    def open(cls, url: str) -> LiteRuns | None:
        path = sqlite_path(url)
        if path is None or not path.is_file():
            return None
        head = head_revision()
        if head is None:
            return None
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

    def last_verified_report(self, mailbox: str) -> str | None:
        """The report (JSON text) of the newest verified pass over `mailbox`, or None."""
        row = self.connection.execute(
            "SELECT report FROM transfer_runs WHERE mailbox = ? AND verified = 1 "
            "ORDER BY id DESC LIMIT 1", (mailbox,)).fetchone()
        return None if row is None else row[0]

    def insert(self, runs: Iterable[Mapping[str, Any]], at: datetime) -> None:
        """Append run rows (values by `RUN_COLUMNS`) in one transaction."""
        stamp = _stamp(at)
        rows = [(*(int(r[c]) if c == "verified" else r[c] for c in RUN_COLUMNS), stamp)
                for r in runs]
        if not rows:
            return
        marks = ", ".join("?" * (len(RUN_COLUMNS) + 1))
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            self.connection.executemany(
                f"INSERT INTO transfer_runs ({', '.join(RUN_COLUMNS)}, at) VALUES ({marks})",
                rows)
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def close(self) -> None:
        self.connection.close()
