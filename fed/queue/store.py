"""fed's node-local SQLite database: queue state, delivery log (the directory, systems and
holds are in the shared database, ``shared_db.py``).

Why one file and one connection: everything fed decides (accept a recipient, deliver it,
hold it, flip it) reads or writes these tables, and all of it runs on fed's single asyncio
event loop. A single connection used only from the loop thread gives a total order of
writes without any lock, and one ``BEGIN IMMEDIATE ... COMMIT`` makes a flip or an up-sync
atomic. WAL mode with ``synchronous=FULL`` makes every commit durable before it returns,
which is what invariant 1 needs for the per-recipient delivery state (the message bytes
themselves live in spool files, see ``spool.py``).

The queue stays local to each node because the spool files it describes are on that
node's disk; what several nodes must agree on is in ``shared_db.py``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mailferry.sqlitewal import set_wal

SCHEMA = """
-- The directory, systems, up-syncs and holds live in the shared database (shared_db.py).
-- This is the node's copy of the held addresses, kept by holds.py, for the queue queries.
CREATE TABLE IF NOT EXISTS holds (
    address TEXT PRIMARY KEY,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    received_at REAL NOT NULL,
    message_id TEXT,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'shunted')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (queue_id, rcpt)
);
CREATE INDEX IF NOT EXISTS recipients_status ON recipients (status, next_try);
CREATE TABLE IF NOT EXISTS shunted (
    queue_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    at REAL NOT NULL,
    code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (queue_id, rcpt)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    queue_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    physical TEXT,
    system TEXT,
    message_id TEXT,
    result TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_rcpt ON deliveries (rcpt, at);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries (queue_id, physical);
-- Queue messages an admin put on hold (fed queue hold QID); delivery skips them.
CREATE TABLE IF NOT EXISTS admin_holds (
    queue_id TEXT PRIMARY KEY,
    since REAL NOT NULL
);
"""


class Store:
    """The SQLite connection; use it from the event loop thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # isolation_level=None: no implicit transactions, we open them explicitly.
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        set_wal(self.conn)
        self.conn.execute("PRAGMA synchronous=FULL")
        self._durable = True  # the connection's synchronous level: FULL (True) or NORMAL
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(SCHEMA)
        # Called before any other reader or writer uses the tables: the spool writes what
        # it holds back (index rows written late, buffered outcomes, ``spool.py``), so
        # nobody sees the tables behind the spool's memory.
        self.catch_up: Callable[[], None] = lambda: None
        self._depth = 0  # open transactions and catch-ups: no catch-up inside one

    def _caught_up(self) -> None:
        if self._depth:
            return
        self._depth += 1
        try:
            self.catch_up()
        finally:
            self._depth -= 1

    @contextmanager
    def transaction(self, durable: bool = True, catch_up: bool = True
                    ) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception).

        `durable=False`: the commit is not fsynced (``synchronous=NORMAL``), for what may
        be lost in a power cut (the spool's index and delivery outcomes). The level is
        switched only when it changes, so a run of such transactions costs no PRAGMA
        statements (each one a GIL hand-off to the writing threads under load).
        `catch_up=False`: for the spool's own writes of what it held back."""
        if catch_up:
            self._caught_up()
        if durable != self._durable:
            self.conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        finally:
            self._depth -= 1
        self.conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] = (), catch_up: bool = True
              ) -> list[sqlite3.Row]:
        """Run a read query (after the spool caught up) and return all rows. `catch_up=False`:
        for a reader that needs none of what the spool holds back (the scheduler's recheck
        of what the queue admin changed)."""
        if catch_up:
            self._caught_up()
        return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the connection (checkpoints the WAL)."""
        self.conn.close()
