"""Wake-ups from the shared database: PostgreSQL LISTEN/NOTIFY instead of a 100 ms poll.

Why: every node must learn of a hold, flip or release made through another node quickly,
and a hold call must learn of the other nodes' acknowledgements quickly. Polling the
version counters every 100 ms does that at a cost of ten SELECTs a second per node, for
ever, and still adds up to 100 ms per hop. On PostgreSQL every change already announces
itself: ``shared_db.bump`` (and an acknowledging heartbeat, ``nodes.py``) runs
``pg_notify('fed_shared', key)`` in the transaction of the change, which PostgreSQL
delivers at commit and only then. This module holds the other end: one connection of its
own per node (psycopg, the driver the shared database already uses), ``LISTEN fed_shared``,
and a callback per notice (the node agent reloads on a counter, the hold call re-reads the
nodes table on ``nodes``).

What it cannot do, and what covers it:

- notices sent while the listener is disconnected are not queued for it. So after every
  (re)LISTEN it calls ``on_listen``, and the node agent re-reads the counters and everything
  that moved since its copy (the counters only grow, so nothing is missed), and hold calls
  look at the nodes table again;
- a connection can die silently (a half-open TCP connection). So it sends ``SELECT 1`` when
  nothing arrived for ``check`` seconds, and the node agent keeps a slow safety poll
  (``--node-safety-poll``) and falls back to the fast poll while the listener is down.

SQLite (the single-node default) has no NOTIFY: there the node agent only polls, as it
does with ``--no-node-notify``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .shared_db import CHANNEL, SharedDB

log = logging.getLogger("fed.notify")


def can_listen(shared: SharedDB) -> str | None:
    """None if this shared database can carry notices to a listener, else why not."""
    if shared.engine.dialect.name != "postgresql":
        return f"{shared.engine.dialect.name} has no LISTEN/NOTIFY"
    try:
        import psycopg  # noqa: F401  (the optional extra mailferry[fed-postgres])
    except ImportError:
        return "psycopg is not installed (pip install 'mailferry[fed-postgres]')"
    return None


class Listener:
    """LISTEN on the shared database's channel, reconnecting for as long as it runs."""

    def __init__(self, shared: SharedDB, name: str, on_notice: Callable[[str], None],
                 on_listen: Callable[[], None], on_lost: Callable[[], None],
                 check: float = 5.0) -> None:
        self.shared = shared
        self.name = name
        self.on_notice = on_notice
        self.on_listen = on_listen
        self.on_lost = on_lost
        self.check = check
        self.listening = False
        self.listens = 0        # successful LISTENs (the first one and every reconnect)
        self.notices = 0
        self.last_error: str | None = None
        self.down_since: float | None = time.monotonic()

    def _connect_args(self) -> dict[str, Any]:
        # The engine's own connection parameters (the password included, never logged).
        _, params = self.shared.engine.dialect.create_connect_args(self.shared.engine.url)
        params.pop("context", None)  # SQLAlchemy's adapters map, not a libpq parameter
        return {**params, "autocommit": True, "connect_timeout": 5,
                "application_name": f"fed-notify {self.name}"[:63],
                "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                "keepalives_count": 3}

    async def run(self) -> None:
        """Listen until cancelled; after a failure retry at once, then backing off from
        0.1 s doubling up to 5 s."""
        import psycopg

        delay = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**self._connect_args())
            except (psycopg.Error, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
                self._listening()
                delay = 0.1
                while True:
                    got = False
                    async for notice in conn.notifies(timeout=self.check):
                        got = True
                        self.notices += 1
                        self.on_notice(notice.payload)
                    if not got:  # quiet for `check` s: is the connection still there?
                        await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._lost(exc)
            finally:
                self.listening = False
                await _close(conn)
            await asyncio.sleep(0.05)  # reconnect at once, but never spin

    def _listening(self) -> None:
        if self.down_since is not None and self.listens:
            log.info("listening for shared-database notices again after %.1f s",
                     time.monotonic() - self.down_since)
        self.listening = True
        self.listens += 1
        self.down_since = None
        self.last_error = None
        self.on_listen()

    def _lost(self, exc: BaseException) -> None:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = self.last_error is None
        if first:
            log.warning("no LISTEN connection to the shared database (%s); polling until "
                        "it is back", message)
        self.last_error = message
        if self.down_since is None:
            self.down_since = time.monotonic()
        if first:  # once per outage: the node agent switches to its fast poll
            self.on_lost()

    def status(self) -> dict[str, Any]:
        """For GET /v1/nodes."""
        return {"listening": self.listening, "listens": self.listens,
                "notices": self.notices, "last_error": self.last_error,
                "down_for": None if self.down_since is None
                else round(time.monotonic() - self.down_since, 3)}


async def _close(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5.0)
    except Exception as exc:  # a broken connection may fail to close: it is gone anyway
        log.debug("closing the LISTEN connection: %s", exc)
