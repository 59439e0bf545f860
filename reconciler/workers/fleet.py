"""What every worker shares: one copy per mailbox, a system's `maxParallel` and its pace.

Why PostgreSQL and not each process's own counters: a policy's `maxParallel` and
`throttle` are what a *system* can take; with four workers, per-process limits would be
four times the limit, and a provider that answers `NO [THROTTLED]` to one worker would
still be hammered by the three others. So:

- `Guard` is one database connection per running job. On it the job takes session-level
  advisory locks: the mailbox's (two workers never copy the same mailbox at once, even
  when procrastinate thought one of them stalled), then one of `maxParallel` slots of the
  source system and one of the target's (the semaphore: `pg_try_advisory_lock(system,
  slot)` for slot 0..n-1). A worker killed with SIGKILL loses its connection, and the
  server drops its locks with it: nothing to expire, nothing to clean. A watchdog pings
  the connection every `ping` seconds; when it fails the guard is `lost`, and the copy
  stops at its next message (`FleetPace.take` raises `GuardLost`): a worker that lost the
  database stops writing, its job is retried elsewhere once its heartbeat is stale.
- `FleetPace` is the mover's `Throttle` for a system, kept in the table `system_pace`
  (GCRA: the row holds the instant the next message may go; a message pushes it by its
  cost, `1/messagesPerSecond` or `size/bytesPerSecond`). One `UPDATE ... RETURNING` per
  message, so four workers together take a system's rate, not four times it. A throttling
  answer (`throttled`) pushes that instant forward for everyone by a pause that doubles
  per answer within a minute (`base`, up to `cap`): every worker slows down, not just the
  connection that got it. Its `throttled(reason) -> pause` is the same call as the
  mover's process-local pace, so it plugs in wherever a system's pace is asked for.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine, text

from reconciler.errors import TemporaryError
from reconciler.mover.pace import BudgetSpent, LocalPace
from reconciler.mover.throttle import Throttle

MAILBOX_LOCKS = 0x4D46  # advisory lock class of the mailbox locks ("MF")


class GuardLost(TemporaryError):
    """The worker's database connection broke: it stops before writing anything more."""


def key32(name: str) -> int:
    """A name as a signed 32-bit advisory-lock key."""
    value = zlib.crc32(name.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class Guard:
    """One job's connection: its advisory locks, and the watchdog that notices its loss."""

    def __init__(self, conninfo: str, *, ping: float = 1.0, poll: float = 0.2,
                 stop: Callable[[], bool] = lambda: False, name: str = "") -> None:
        # Named in pg_stat_activity: an admin (or a test) sees whose locks these are.
        self.conn = psycopg.connect(conninfo, autocommit=True,
                                    application_name=f"mailferry-guard {name}"[:63])
        self.lost = threading.Event()
        self.poll, self.stop = poll, stop
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, args=(ping,), daemon=True,
                                       name="guard-watchdog")
        self._watch.start()

    def _watchdog(self, ping: float) -> None:
        while not self._done.wait(ping):
            try:
                with self._lock:
                    self.conn.execute("SELECT 1")
            except psycopg.Error:
                self.lost.set()
                return

    def held(self) -> bool:
        """Whether the connection (and so every lock on it) is still there, asked now:
        a result is written only while it is (another worker may hold the locks else)."""
        if self.lost.is_set():
            return False
        try:
            with self._lock:
                self.conn.execute("SELECT 1")
        except psycopg.Error:
            self.lost.set()
        return not self.lost.is_set()

    def _try(self, a: int, b: int) -> bool:
        with self._lock:
            row = self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (a, b)).fetchone()
        return bool(row and row[0])

    def _until(self, acquire: Callable[[], bool], what: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not acquire():
            if self.lost.is_set():
                raise GuardLost("the database connection broke", step=what)
            if self.stop() or (deadline is not None and time.monotonic() >= deadline):
                raise TemporaryError(f"waited too long for {what}", delay=5.0)
            time.sleep(self.poll)

    def mailbox(self, key: str, timeout: float | None = None) -> None:
        """Wait for the mailbox's lock (held until the guard closes)."""
        self._until(lambda: self._try(MAILBOX_LOCKS, key32(key)), f"the lock of {key}",
                    timeout)

    def slot(self, name: str, size: int, timeout: float | None = None) -> int:
        """Wait for one of `size` slots of `name` (held until the guard closes)."""
        got: list[int] = []

        def one() -> bool:
            for slot in range(max(1, size)):
                if self._try(key32(name), slot):
                    got.append(slot)
                    return True
            return False

        self._until(one, f"a slot of {name} (maxParallel {size})", timeout)
        return got[0]

    def close(self) -> None:
        """Release every lock (the connection goes)."""
        self._done.set()
        with self._lock:
            self.conn.close()


@contextmanager
def guarded(conninfo: str, **kwargs: object) -> Iterator[Guard]:
    guard = Guard(conninfo, **kwargs)  # type: ignore[arg-type]
    try:
        yield guard
    finally:
        guard.close()


_TAKE = text("""
UPDATE system_pace SET tat = greatest(tat, timezone('UTC', clock_timestamp()))
                             + make_interval(secs => :cost)
 WHERE system = :system
RETURNING extract(epoch FROM tat - timezone('UTC', clock_timestamp())) - :cost
""")
_PEEK = text("""
SELECT extract(epoch FROM tat - timezone('UTC', clock_timestamp()))
  FROM system_pace WHERE system = :system
""")
_STRIKE = text("""
UPDATE system_pace
   SET strikes = CASE WHEN struck_at > timezone('UTC', clock_timestamp()) - interval '60 s'
                      THEN strikes + 1 ELSE 1 END,
       struck_at = timezone('UTC', clock_timestamp()), reason = :reason
 WHERE system = :system
RETURNING strikes
""")
_PUSH = text("""
UPDATE system_pace SET tat = greatest(tat, timezone('UTC', clock_timestamp()))
                             + make_interval(secs => :pause)
 WHERE system = :system
""")
_ROW = text("""
INSERT INTO system_pace (system, tat, strikes, reason)
VALUES (:system, timezone('UTC', clock_timestamp()), 0, '') ON CONFLICT (system) DO NOTHING
""")


class FleetPace(Throttle):
    """A system's pace shared by every worker through the state store (module docstring)."""

    def __init__(self, engine: Engine, system: str, messages_per_second: float | None = None,
                 bytes_per_second: float | None = None, *, lost: threading.Event | None = None,
                 base: float = 2.0, cap: float = 120.0, peek_every: float = 0.5) -> None:
        super().__init__(messages_per_second, bytes_per_second)
        self.engine, self.system = engine, system
        self.lost = lost or threading.Event()
        self.base, self.cap, self.peek_every = base, cap, peek_every
        self._peeked = -1e9
        with engine.begin() as conn:
            conn.execute(_ROW, {"system": system})

    def cost(self, size: int) -> float:
        """Seconds of the system's capacity one message of `size` bytes uses."""
        return max(1.0 / self.mps if self.mps else 0.0,
                   float(size) / self.bps if self.bps else 0.0)

    def reserve(self, size: int) -> float:
        """Claim the next free instant for one message: seconds to wait until it."""
        if self.lost.is_set():
            raise GuardLost("the database connection broke", step=self.system)
        cost = self.cost(size)
        if not cost:  # no rate: only a back-off can make us wait (looked at twice a second)
            if time.monotonic() - self._peeked < self.peek_every:
                return 0.0
            self._peeked = time.monotonic()
            with self.engine.begin() as conn:
                ahead = conn.execute(_PEEK, {"system": self.system}).scalar()
            return max(0.0, float(ahead or 0.0))
        with self.engine.begin() as conn:
            wait = conn.execute(_TAKE, {"system": self.system, "cost": cost}).scalar()
        return max(0.0, float(wait or 0.0))

    async def take(self, size: int) -> None:
        wait = await asyncio.to_thread(self.reserve, size)
        if wait > 0:
            await asyncio.sleep(wait)
        if self.lost.is_set():
            raise GuardLost("the database connection broke", step=self.system)

    def throttled(self, reason: str) -> float:
        """The system answered "too much": every worker waits `pause` more seconds before
        its next message to it (doubling per answer within a minute); the pause."""
        with self.engine.begin() as conn:
            strikes = conn.execute(_STRIKE, {"system": self.system,
                                             "reason": reason[:500]}).scalar() or 1
            pause = min(self.cap, self.base * 2.0 ** (int(strikes) - 1))
            conn.execute(_PUSH, {"system": self.system, "pause": pause})
        return pause

    def state(self) -> dict[str, object]:
        with self.engine.begin() as conn:
            row = conn.execute(text("SELECT strikes, reason FROM system_pace "
                                    "WHERE system = :s"), {"s": self.system}).first()
        return {"system": self.system, "strikes": row[0] if row else 0,
                "reason": row[1] if row else ""}


class SharedPace:
    """A system's `SystemPace` in a worker: this process's pace (its connection limits,
    daily budget, its own halving of connections) with the fleet's back-off around it. A
    throttling answer an endpoint gets is told to both, so every worker waits; before
    each message the shared back-off is looked at (twice a second, no rate: the copy's
    `FleetPace` already takes the policy's rate)."""

    def __init__(self, local: LocalPace, fleet: FleetPace) -> None:
        self.local, self.fleet = local, fleet
        self.system = local.system

    async def connect(self, user: str) -> None:
        await self.local.connect(user)

    def disconnect(self, user: str) -> None:
        self.local.disconnect(user)

    @property
    def pooling(self) -> bool:
        return self.local.pooling

    def shed(self) -> bool:
        return self.local.shed()

    async def take(self, size: int) -> None:
        await self.fleet.take(0)
        await self.local.take(size)

    def reserve(self, size: int) -> bool:
        return self.local.reserve(size)

    def spent(self) -> BudgetSpent:
        return self.local.spent()

    def throttled(self, reason: str) -> float:
        return max(self.local.throttled(reason), self.fleet.throttled(reason))

    def state(self) -> dict[str, object]:
        return {**self.local.state(), "fleet": self.fleet.state()}
