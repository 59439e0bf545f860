"""Switching a new SQLite file to WAL while another connection takes its write lock.

The race CI met (six processes opening one new state store) is made deterministic here:
a progress handler on the switching connection lets another connection take the file's
RESERVED lock right after the switch has read the header, which is the moment two
concurrent switches collide. SQLite then answers "database is locked" at once, whatever
the busy timeout; `set_wal` asks again until the other connection is done."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.pool import Pool

from mailferry.sqlitewal import set_wal
from reconciler.state.store import open_store


@dataclass
class Hold:
    """Another connection's write lock: `taken` once it has it, `done` ends it early."""

    taken: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def collide(connection: sqlite3.Connection, path: Path, release_after: float | None) -> Hold:
    """Arrange for another connection to take `path`'s write lock while `connection`'s next
    statement runs; it lets go after `release_after` seconds (None: once `done` is set)."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    hold = Hold()

    def progress() -> int:
        if not hold.taken.is_set():
            other.execute("BEGIN IMMEDIATE")
            hold.taken.set()
            threading.Thread(target=release, daemon=True).start()
        return 0

    def release() -> None:
        hold.done.wait(release_after if release_after is not None else 60)
        other.execute("COMMIT")
        other.close()

    connection.set_progress_handler(progress, 1)
    return hold


def test_the_collision_fails_a_plain_switch_at_once_whatever_the_busy_timeout(
        tmp_path: Path) -> None:
    """The premise: SQLite does not wait here (it could deadlock), busy_timeout or not."""
    path = tmp_path / "new.db"
    ours = sqlite3.connect(path, timeout=10)
    hold = collide(ours, path, release_after=0.05)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        ours.execute("PRAGMA journal_mode=WAL")
    assert hold.taken.is_set() and time.monotonic() - started < 1.0


def test_set_wal_asks_again_until_the_other_writer_is_done(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    ours = sqlite3.connect(path, timeout=10)
    hold = collide(ours, path, release_after=0.05)
    set_wal(ours)
    assert hold.taken.is_set()
    ours.set_progress_handler(None, 0)
    assert ours.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_set_wal_gives_up_after_its_time(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    ours = sqlite3.connect(path, timeout=10)
    hold = collide(ours, path, release_after=None)
    started = time.monotonic()
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            set_wal(ours, within=0.2)
        assert 0.2 <= time.monotonic() - started < 5
    finally:
        hold.done.set()


class Refusing:
    """A DB-API connection whose pragma fails with `error` (counting the attempts)."""

    def __init__(self, error: str, times: int) -> None:
        self.error, self.times, self.attempts = error, times, 0

    def cursor(self) -> Refusing:
        return self

    def execute(self, _sql: str) -> None:
        self.attempts += 1
        if self.attempts <= self.times:
            raise sqlite3.OperationalError(self.error)

    def close(self) -> None:
        pass


def test_other_errors_are_not_asked_again() -> None:
    refusing = Refusing("disk I/O error", times=5)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        set_wal(refusing)
    assert refusing.attempts == 1


@pytest.fixture
def colliding_connects(tmp_path: Path) -> Iterator[list[Hold]]:
    """Every new SQLite connection of SQLAlchemy's pools meets the collision on its first
    statement (the pool's connect hooks run in order: this one first)."""
    holds: list[Hold] = []

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection) and not holds:
            holds.append(collide(dbapi_connection, tmp_path / "state.db", 0.05))

    event.listen(Pool, "connect", on_connect, insert=True)
    try:
        yield holds
    finally:
        event.remove(Pool, "connect", on_connect)


def test_a_new_state_store_opens_through_the_collision(
        tmp_path: Path, colliding_connects: list[Hold]) -> None:
    """Before `set_wal`, the store's connect hook failed here: open_store raised."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert colliding_connects and colliding_connects[0].taken.is_set()
        with store.engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        store.close()
