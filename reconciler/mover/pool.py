"""Logged-in IMAP connections kept for the next pass over the same mailbox, per process.

Why: a pass that finds nothing to copy costs, per mailbox, one `LIST ... RETURN (STATUS
...)` per side, and before it a TCP connect, the greeting and a login per side (NAMESPACE
and the LIST ride behind the login in the same write).
On Dovecot a login also starts an `imap-login` and an `imap` process; for 20 small mailboxes
that setup was most of a no-op re-run. A process that passes over the same mailboxes more
than once keeps the connections of the previous pass and skips all of it (today `mover
copy --rerun`; the engine's steps run one pass each and log in each time).

A connection is keyed by everything that decides what it is logged in as (host, port, TLS,
login, authorization id, password): IMAP cannot switch users on a connection, so a master
user still needs one connection per mailbox, and two mailboxes never share one. One is
pooled only when healthy and with no folder selected (UNSELECT, or CLOSE on a folder opened
read-only with EXAMINE, which expunges nothing), so the next user starts where a fresh
login would. A connection the server dropped while idle is noticed by its reader; one that
breaks on its first command is a retryable error like any broken connection (the runner
retries the mailbox with a fresh login). At most `max_idle` connections wait, the oldest
logged out first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from mailferry.mail.imap.client import ImapClient


@dataclass
class Idle:
    """A logged-in connection and what its endpoint learnt at login."""

    client: ImapClient
    separator: str | None
    prefix: str
    since: float = 0.0  # monotonic time it went idle (set by the pool)
    foreign: tuple[str, ...] = ()  # other users' and shared namespace prefixes


class ConnectionPool:
    """Idle logged-in connections by login; use from one event loop."""

    def __init__(self, max_idle: int = 512, max_age: float | None = None) -> None:
        self.max_idle = max_idle
        self.max_age = max_age  # seconds an idle connection may wait (None: no limit)
        self._idle: OrderedDict[Hashable, list[Idle]] = OrderedDict()
        self.reused = 0  # connections handed out again (tests and stats)

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, key: Hashable) -> Idle | None:
        """A usable idle connection for this login, or None."""
        waiting = self._idle.get(key)
        while waiting:
            idle = waiting.pop()
            fresh = self.max_age is None or time.monotonic() - idle.since <= self.max_age
            if fresh and idle.client.usable:
                self.reused += 1
                return idle
            idle.client.close()
        self._idle.pop(key, None)
        return None

    async def give(self, key: Hashable, idle: Idle) -> None:
        """Keep a connection (no folder selected) for the next pass; log out the oldest
        when more than `max_idle` wait."""
        if not idle.client.usable:
            idle.client.close()
            return
        idle.since = time.monotonic()
        self._idle.setdefault(key, []).append(idle)
        self._idle.move_to_end(key)
        while len(self) > self.max_idle:
            _, oldest = next(iter(self._idle.items()))
            victim = oldest.pop(0)
            if not oldest:
                self._idle.popitem(last=False)
            await victim.client.logout()

    def forget(self, key: Hashable) -> int:
        """Drop the idle connections of one login (its mailbox was deleted or recreated: a
        session opened on the old one must not serve the new one); how many."""
        waiting = self._idle.pop(key, [])
        for idle in waiting:
            idle.client.close()
        return len(waiting)

    async def close(self) -> None:
        """Log every idle connection out."""
        idle, self._idle = self._idle, OrderedDict()
        for waiting in idle.values():
            for item in waiting:
                await item.client.logout()
