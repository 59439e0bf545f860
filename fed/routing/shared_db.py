"""The database several fed nodes share: directory, systems, up-syncs, holds, nodes.

Why a separate database from ``store.py``: the queue is local to a node (its spool files
are on that node's disk), but the directory and the holds must be one truth for every node,
or a hold taken through node A would not stop node B. So these tables live in one
SQLAlchemy database given by ``fed serve --shared-db URL``: by default
``sqlite:///<state dir>/shared.db`` (a single node needs no new setup), PostgreSQL
(``postgresql+psycopg://...``) when several nodes run.

Why SQLAlchemy Core and no ORM: every query here is a small, explicit statement, and the
hot path never reaches this module (``directory.py`` and ``holds.py`` keep in-memory
copies refreshed on version counters, see ``nodes.py``).

Concurrency: every writer goes through ``write()``, which serialises all shared writes:
``BEGIN IMMEDIATE`` on SQLite, a row lock on the ``meta`` version row on PostgreSQL
(``SELECT ... FOR UPDATE``). Node heartbeats skip that lock; each node only writes its own
row. Times that nodes compare (heartbeats, lease expiry) come from the database's clock
(``db_now``), so the nodes' own clocks need not agree.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    func,
    insert,
    inspect,
    literal_column,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.sql.elements import ColumnElement

from mailferry.sqlitewal import set_wal

log = logging.getLogger("fed.shared")

metadata = MetaData()

directory = Table(
    "directory", metadata,
    Column("address", String(320), primary_key=True),
    Column("physical", String(320), nullable=False),
    Index("directory_physical", "physical"),
)
systems = Table(
    "systems", metadata,
    Column("name", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("protocol", String(8), nullable=False),
    # Bumped by a refresh (the system's tables changed): every node retires the connections
    # it opened to the system under an older generation. Added after the first release.
    Column("generation", BigInteger, nullable=False, server_default="0"),
    # TLS to the system ('none', 'starttls' or 'implicit') and the CA file that verifies
    # its certificate (NULL: the roots of fed's machine). Added after the first release.
    Column("tls", String(16), nullable=False, server_default="none"),
    Column("cafile", String(1000), nullable=True),
    # SMTP AUTH to a system fed does not relay to by network (a hosted target): the user and
    # the *file* holding the password (read at each login, never stored here)
    Column("auth_user", String(320), nullable=True),
    Column("auth_file", String(1000), nullable=True),
    # RCPT TO for a physical address: "" the physical address itself, else a format of the
    # mailbox's access address ({address}, {local}, {domain}) for a system that knows only that
    Column("rcpt", String(320), nullable=False, server_default=""),
    CheckConstraint("protocol IN ('lmtp', 'smtp')", name="systems_protocol"),
)
# Version counters: 'version' (directory, the down-sync version), 'systems_version',
# 'holds_version'. Every change bumps its counter in the same transaction.
meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)
upsync_state = Table(
    "upsync_state", metadata,
    Column("system", String(255), primary_key=True),
    Column("at", Float, nullable=False),
)
upsync = Table(
    "upsync", metadata,
    Column("system", String(255), nullable=False),
    Column("physical", String(320), nullable=False),
    Column("address", String(320), nullable=False),
    Column("position", Integer, nullable=False),
    PrimaryKeyConstraint("system", "physical", "address"),
    Index("upsync_address", "address"),
)
# One row per (held address, the address whose hold covers it): a hold on an address
# covers its aliases and its physical address (see holds.py); `origin = address` is the
# hold as asked for.
holds = Table(
    "holds", metadata,
    Column("address", String(320), nullable=False),
    Column("origin", String(320), nullable=False),
    Column("since", Float, nullable=False),
    PrimaryKeyConstraint("address", "origin"),
    Index("holds_origin", "origin"),
)
# One row per fed node (see nodes.py for the protocol these columns carry).
nodes = Table(
    "nodes", metadata,
    Column("name", String(255), primary_key=True),
    Column("heartbeat_at", Float, nullable=False),    # database clock
    Column("dead_after", Float, nullable=False),      # s of silence after which it is harmless
    Column("holds_seen", BigInteger, nullable=False),  # holds version loaded
    Column("idle_for", BigInteger, nullable=False),    # ... and nothing held in flight
    Column("started_at", Float, nullable=False),
    Column("info", String(1000), nullable=False),
    # HOST:PORT of its control API, as bound (fed queue reaches every node through it);
    # added after the first release: _create() adds it to an older table.
    Column("control", String(300), nullable=True),
)

COUNTERS = ("version", "systems_version", "holds_version")
# The PostgreSQL channel every change is announced on (``announce``); the payload is the
# counter that moved, or ``nodes`` for a node's acknowledgement (fed/routing/notify.py).
CHANNEL = "fed_shared"
# The highest fencing token (a reconciler lease's generation) a mutating control call has
# carried, per lease (the id of the lease row in that reconciler's state store: one fed may
# serve several state stores, each with its own lease). A call with a lower one comes from
# a reconciler that lost its lease and is refused (docs/fed-api.md, fencing). In the shared
# database, so it is the same for every node and survives restarts like the directory.
fences = Table(
    "fences", metadata,
    Column("lease", String(64), primary_key=True),
    Column("generation", BigInteger, nullable=False),
)
# The fencing token (lease, generation) of the control request being served (set by the
# control API around its handler; None for fed's own writes and for calls without one).
# Every `write()` checks it inside its transaction, under the writers' lock: the check and
# the change it guards are one atomic step, so no newer holder can slip in between.
fence_token: ContextVar[tuple[str, int] | None] = ContextVar("fence_token", default=None)


class Fenced(Exception):
    """A control call carried an older fencing token than fed has seen for its lease."""

    def __init__(self, given: int, current: int) -> None:
        super().__init__(f"fencing token {given} is older than {current}: another reconciler "
                         "holds a newer lease; this one must stop")
        self.given = given
        self.current = current


def default_url(state_dir: str) -> str:
    """The single-node default: a SQLite file next to the node's queue."""
    return f"sqlite:///{state_dir}/shared.db"


class SharedDB:
    """The engine plus the write discipline and the database clock."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite")
        self.engine: Engine = _engine(url)
        self._create()

    def _create(self) -> None:
        # Two nodes starting at once may race on CREATE TABLE / the counter rows: retry.
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                self._add_missing_columns()
                with self.engine.begin() as conn:
                    have = set(conn.scalars(select(meta.c.key)))
                    for key in COUNTERS:
                        if key not in have:
                            conn.execute(insert(meta).values(key=key, value=0))
                return
            except (IntegrityError, OperationalError, ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _add_missing_columns(self) -> None:
        """Columns added to a table after a release, on a database created before: an
        ``ALTER TABLE ... ADD COLUMN`` (nullable, so old nodes still running keep writing
        their rows). Two nodes racing here: the loser's ALTER fails and ``_create``
        retries, finding the column."""
        have = {c["name"] for c in inspect(self.engine).get_columns("nodes")}
        if "control" not in have:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE nodes ADD COLUMN control VARCHAR(300)")
            log.info("shared database: added the column nodes.control")
        if "generation" not in {c["name"] for c in inspect(self.engine).get_columns("systems")}:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    "ALTER TABLE systems ADD COLUMN generation BIGINT NOT NULL DEFAULT 0")
            log.info("shared database: added the column systems.generation")
        have = {c["name"] for c in inspect(self.engine).get_columns("systems")}
        for column, ddl in (("tls", "VARCHAR(16) NOT NULL DEFAULT 'none'"),
                            ("cafile", "VARCHAR(1000)"), ("auth_user", "VARCHAR(320)"),
                            ("auth_file", "VARCHAR(1000)"),
                            ("rcpt", "VARCHAR(320) NOT NULL DEFAULT ''")):
            if column not in have:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE systems ADD COLUMN {column} {ddl}")
                log.info("shared database: added the column systems.%s", column)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that no other shared-DB writer runs concurrently with."""
        with self.engine.connect() as conn:
            conn.info["immediate"] = True
            try:
                with conn.begin():
                    if not self.sqlite:
                        conn.execute(select(meta.c.value).where(meta.c.key == "version")
                                     .with_for_update())
                    given = fence_token.get()
                    if given is not None:
                        check_fence(conn, *given)
                    yield conn
            finally:
                conn.info.pop("immediate", None)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction on one snapshot (rolled back at the end).

        One snapshot matters: a node that reads a release must also read every flip
        committed before it. SQLite's read transactions are snapshots already; PostgreSQL
        needs REPEATABLE READ (READ COMMITTED gives each statement its own)."""
        with self.engine.connect() as conn:
            if not self.sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def now(self) -> ColumnElement[Any]:
        """The database's clock in epoch seconds, as a SQL expression."""
        if self.sqlite:
            return literal_column("((julianday('now') - 2440587.5) * 86400.0)")
        return literal_column("EXTRACT(EPOCH FROM clock_timestamp())")

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def current_fence(conn: Connection, lease: str) -> int:
    """The highest fencing token seen so far for `lease` (0: none yet)."""
    return int(conn.scalar(select(fences.c.generation).where(fences.c.lease == lease)) or 0)


def check_fence(conn: Connection, lease: str, given: int) -> None:
    """Fenced when `given` is older than the highest token seen for `lease`; a newer one
    raises the bar (inside the caller's write transaction)."""
    current = current_fence(conn, lease)
    if given < current:
        raise Fenced(given, current)
    if given == current:
        return
    if current == 0:
        conn.execute(insert(fences).values(lease=lease, generation=given))
    else:
        conn.execute(update(fences).where(fences.c.lease == lease).values(generation=given))
    log.info("fencing token of lease %s now %d (was %d)", lease, given, current)


def counters(conn: Connection) -> dict[str, int]:
    """Every version counter, read in one statement (one snapshot)."""
    return {str(k): int(v) for k, v in conn.execute(select(meta.c.key, meta.c.value))}


def bump(conn: Connection, key: str, by: int = 1) -> int:
    """Increment one counter (by `by` changes) inside the caller's write transaction, and
    announce it to the listening nodes; the new value."""
    conn.execute(update(meta).where(meta.c.key == key).values(value=meta.c.value + by))
    announce(conn, key)
    return int(conn.scalar(select(meta.c.value).where(meta.c.key == key)) or 0)


def announce(conn: Connection, key: str) -> None:
    """``pg_notify(CHANNEL, key)`` inside the caller's transaction (PostgreSQL only; a no-op
    elsewhere). PostgreSQL delivers it only when the transaction commits, after the change
    is visible, so a node that reads on the notification sees the change; a rolled-back
    change announces nothing. Several notices of one key in one transaction arrive as one."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(CHANNEL, key)))


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        # A bounded connect: an unreachable database must not hang a refresh or shutdown.
        args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                             connect_args=args)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        # No implicit transactions from the driver: the "begin" hook below opens them, so
        # a writer can ask for BEGIN IMMEDIATE (take the write lock before reading).
        dbapi_conn.isolation_level = None
        set_wal(dbapi_conn)  # the nodes of `--processes N` open a new file at once
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")

    return engine


def import_legacy(shared: SharedDB, local_db: str) -> bool:
    """Copy the directory, systems, up-syncs and holds that a fed before the shared database
    kept in its local ``fed.db``, once, into an empty shared database; True if it did.

    Why: an upgraded single-node fed must keep its routes and, above all, its holds (a
    hold lost mid-migration would deliver to the old mailbox)."""
    try:
        old = sqlite3.connect(f"file:{local_db}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        names = {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "directory" not in names or "systems" not in names:
            return False
        with shared.write() as db:
            if db.scalar(select(meta.c.value).where(meta.c.key == "legacy_imported")) \
                    is not None or db.scalar(select(directory.c.address).limit(1)) is not None \
                    or db.scalar(select(systems.c.name).limit(1)) is not None:
                return False
            db.execute(insert(meta).values(key="legacy_imported", value=1))
            rows = {
                directory: old.execute("SELECT address, physical FROM directory").fetchall(),
                systems: old.execute("SELECT name, host, port, protocol FROM systems").fetchall(),
                upsync_state: old.execute("SELECT system, at FROM upsync_state").fetchall()
                if "upsync_state" in names else [],
                upsync: old.execute("SELECT system, physical, address, position FROM upsync")
                .fetchall() if "upsync" in names else [],
            }
            for table, found in rows.items():
                if found:
                    db.execute(insert(table), [dict(zip(table.c.keys(), r, strict=True))
                                               for r in found])
            held = old.execute("SELECT address, since FROM holds").fetchall() \
                if "holds" in names else []
            if held:
                db.execute(insert(holds), [{"address": a, "origin": a, "since": s}
                                           for a, s in held])
            version = old.execute("SELECT value FROM meta WHERE key = 'version'").fetchone() \
                if "meta" in names else None
            db.execute(update(meta).where(meta.c.key == "version")
                       .values(value=int(version[0]) if version else 0))
            for key in ("systems_version", "holds_version"):
                bump(db, key)
            return bool(rows[directory] or rows[systems] or held)
    finally:
        old.close()
