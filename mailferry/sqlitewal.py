"""Switching a SQLite database to WAL mode when several processes may open it at once.

Why this needs more than `busy_timeout`: a new database file starts in rollback-journal
mode, and `PRAGMA journal_mode=WAL` reads its header (a shared lock) and then writes it (an
exclusive one). Two connections switching at the same moment both hold the shared lock and
each waits for the other's to go: SQLite answers one of them SQLITE_BUSY ("database is
locked") at once, without calling its busy handler, because waiting could deadlock (the
case sqlite3_busy_handler's documentation names). The other switch then completes in
milliseconds, and once the file is in WAL mode the pragma takes no write lock at all; so
the loser asks again. Seen in CI: `tests/test_state_store.py`'s six processes opening one
new state store, one of them exiting on the lock (2026-12-08).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

SWITCH_WITHIN = 10.0  # seconds: the state store's busy_timeout
_AGAIN_AFTER = 0.01  # seconds between attempts: the winner's switch takes milliseconds


def set_wal(connection: Any, *, within: float = SWITCH_WITHIN) -> None:
    """`PRAGMA journal_mode=WAL` on a DB-API SQLite connection, asked again while another
    connection's switch holds the file (`within` seconds at most, then its error)."""
    deadline = time.monotonic() + within
    while True:
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        finally:
            cursor.close()
        time.sleep(_AGAIN_AFTER)
