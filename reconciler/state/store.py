"""Opening the state store and writing transitions.

The store is any SQLAlchemy URL (SQLite file by default; PostgreSQL to scale out). Its schema
is owned by Alembic: `open_store` upgrades the database to the newest revision before any
use, so an old state file from a previous release keeps working and nobody runs
`create_all` by hand. A store already at the head revision (read from the scripts' text)
opens without importing Alembic: a short command, such as a `mover copy` that finds
nothing to copy, would otherwise spend a sixth of its time there.

`record_transition` is the one way a migration changes state: the row update and the event
row are written in the caller's transaction, so that either both are committed or neither
(invariant 4: "the state change and an event row are committed together after the action
succeeded").
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from mailferry.sqlitewal import set_wal

# (re-exported: one reader of the scripts' head, shared with the SQLAlchemy-free `lite`)
from reconciler.state.lite import ALEMBIC_DIR as ALEMBIC_DIR
from reconciler.state.lite import default_url as default_url
from reconciler.state.lite import head_revision as head_revision
from reconciler.state.model import Event, Migration, utcnow


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout rides out the short write locks instead of failing a step (first: the
    # switch to WAL waits with it too); WAL lets the station API read while the engine
    # writes (`set_wal`: several processes may make a new store's file at once).
    cursor.execute("PRAGMA busy_timeout=10000")
    set_wal(dbapi_connection)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


@contextmanager
def _upgrade_lock(engine: Engine) -> Iterator[None]:
    """One upgrader at a time: two reconcilers opening a new store at once (a watch and a
    `reconcile status`, say) would otherwise both create Alembic's version table."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield  # PostgreSQL: the advisory lock in `upgrade` does it
        return
    with open(f"{database}.upgrade-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def at_head(engine: Engine) -> bool:
    """The database is already at the scripts' head: opening it needs no Alembic at all
    (importing and running Alembic was a third of a short `mover copy`'s start)."""
    head = head_revision()
    if head is None:
        return False
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        versions = set(connection.scalars(text("SELECT version_num FROM alembic_version")))
    return versions == {head}


def upgrade(engine: Engine) -> None:
    """Bring the database schema to Alembic's head revision (serialised between processes)."""
    if at_head(engine):
        return
    from alembic import command  # only when there is something to upgrade: startup time
    from alembic.config import Config  # (the same: +0.12 s)

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    with _upgrade_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # held until this transaction ends
            connection.execute(text("SELECT pg_advisory_xact_lock(7316551)"))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Store:
    """A state store: an engine, a session factory, and the transition writer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def open_store(url: str | None = None) -> Store:
    """Open (and upgrade) the store at `url`, default `./mailferry-state.db`."""
    return Store(url or default_url())


def record_event(
    session: Session, migration: Migration | None, step: str, *, address: str = "",
    from_state: int | None = None, to_state: int | None = None,
    detail: str | dict[str, Any] = "", commit: str | None = None, at: datetime | None = None,
) -> Event:
    """Append one event row in the caller's transaction."""
    text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
    row = Event(
        at=at or utcnow(),
        migration_id=migration.id if migration is not None else None,
        address=address or (migration.address if migration is not None else ""),
        step=step, from_state=from_state, to_state=to_state, detail=text,
        specs_commit=commit,
    )
    session.add(row)
    return row


def record_transition(
    session: Session, migration: Migration, step: str, to_state: int, *,
    detail: str | dict[str, Any] = "", commit: str | None = None, at: datetime | None = None,
) -> None:
    """Move `migration` to `to_state` and append its event, in the caller's transaction."""
    now = at or utcnow()
    from_state = migration.state
    migration.state = to_state
    migration.state_since = now
    migration.last_error = None
    migration.next_attempt_at = None
    migration.attempts = 0
    migration.error_since = None
    record_event(session, migration, step, from_state=from_state, to_state=to_state,
                 detail=detail, commit=commit, at=now)
