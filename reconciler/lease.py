"""One reconciler acts at a time: a lease row in the state store.

Why a lease and not a lock file: two reconcilers may run on two machines against one
PostgreSQL state store (or an admin may start `reconcile --apply` while `--watch` runs in a
systemd unit). Both would run the same step of the same migration; steps are idempotent,
but holds, flips and the data mover racing each other is not something to rely on. The state
store is the one thing every reconciler shares, so the lease lives there.

How it works (the Kubernetes Lease / etcd election pattern, without a server):

- the row `leases[name]` says who holds it (`host:pid`) and until when (`expires_at`);
- *acquire* is a compare-and-set: INSERT the row, and when it exists UPDATE it
  ``WHERE name = :name AND (holder = :me OR expires_at < :now)``; the database's row lock
  makes exactly one of two concurrent updaters see rowcount 1. This works the same on
  SQLite (writes serialised by the database lock) and PostgreSQL (row locks), with no
  SELECT ... FOR UPDATE needed;
- the holder *renews* (UPDATE ... WHERE holder = :me) every `ttl / 3` from a background
  thread while it works, so a long data copy keeps the lease;
- a holder that stops renewing (killed, hung, partitioned) loses the lease when it
  expires, and the next reconciler *takes it over* and says so; a holder on the same host
  whose process is gone (kill -9) is taken over at once, without waiting for the TTL;
- a holder that finds its renewal refused (someone took over after it stalled) sets `lost`
  and the engine stops after the current step;
- every acquisition adds one to the row's `generation`, the *fencing token*: the holder
  sends it with every mutating call to fed (`FedClient.fence`), and fed refuses a call with
  a lower one than it has seen (docs/fed-api.md). A holder that stalled past its TTL (a
  paused VM, a partition) and wakes up mid-step cannot notice in time that it lost the
  lease -- its renewal thread may not even have run -- but fed can: the new holder's first
  call raised the bar. Released leases keep their row (holder empty) so the generation
  never goes back.

Clocks: expiry compares the renewing reconciler's clock with the acquiring one's; keep hosts
on NTP and the TTL (default 30 s) well above any skew.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from reconciler.errors import MailferryError
from reconciler.state.model import Lease as LeaseRow
from reconciler.state.model import utcnow
from reconciler.state.store import Store

DEFAULT_NAME = "reconciler"
DEFAULT_TTL = 30.0


def holder_id() -> str:
    """This process as a lease holder: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(holder: str) -> bool:
    """True when `holder` is a process of this host that has exited (kill -9, crash)."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as read from the store."""

    holder: str
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    generation: int = 0

    def describe(self, now: datetime) -> str:
        """`host:pid (since ..., renewed 3 s ago, expires in 27 s)` for messages."""
        renewed = (now - self.renewed_at).total_seconds()
        left = (self.expires_at - now).total_seconds()
        expiry = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return (f"{self.holder} (since {self.acquired_at:%Y-%m-%dT%H:%M:%SZ}, "
                f"renewed {renewed:.0f} s ago, {expiry})")


class LeaseHeld(MailferryError):
    """Another reconciler holds the lease."""

    def __init__(self, info: LeaseInfo, now: datetime) -> None:
        super().__init__(f"another reconciler holds the lease: {info.describe(now)}")
        self.info = info


class Lease:
    """The lease `name` in `store`, for holder `holder`."""

    def __init__(self, store: Store, *, name: str = DEFAULT_NAME, holder: str | None = None,
                 ttl: float = DEFAULT_TTL, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.name = name
        self.holder = holder or holder_id()
        self.ttl = ttl
        self.clock = clock
        self.lost = threading.Event()
        self.took_over: LeaseInfo | None = None  # the stale holder we replaced, if any
        self.generation = 0  # our fencing token, set by each acquisition
        self.fence_id = ""  # the lease row's id for fed (one fed, several state stores)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> LeaseInfo | None:
        """The lease row, or None when nobody holds it."""
        return current_holder(self.store, self.name)

    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease if free, ours or expired; else return who holds it."""
        now = self.clock()
        expires = now + timedelta(seconds=self.ttl)
        before = self.read()
        try:
            with self.store.session() as session:
                session.execute(insert(LeaseRow).values(
                    name=self.name, holder=self.holder, acquired_at=now, renewed_at=now,
                    expires_at=expires, generation=1, fence_id=uuid.uuid4().hex))
            self.generation = 1
            self.fence_id = self._fence_id()
            return None
        except IntegrityError:
            pass
        dead = before is not None and _dead_here(before.holder)
        with self.store.session() as session:
            stale = ((LeaseRow.holder == self.holder) | (LeaseRow.expires_at < now)
                     | (LeaseRow.holder == ""))
            if dead and before is not None:  # a holder on this host that no longer exists
                stale = stale | (LeaseRow.holder == before.holder)
            done = session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, stale)
                .values(holder=self.holder, acquired_at=now, renewed_at=now,
                        expires_at=expires, generation=LeaseRow.generation + 1))
            taken = getattr(done, "rowcount", 0) == 1
            if taken:  # read in the same transaction: nobody can have bumped it since
                row = session.get_one(LeaseRow, self.name)
                if not row.fence_id:  # a row from before fencing: name it now, once
                    row.fence_id = uuid.uuid4().hex
                self.generation, self.fence_id = int(row.generation), row.fence_id
        if taken:
            if before is not None and before.holder != self.holder:
                self.took_over = before
            return None
        return self.read() or LeaseInfo("(gone)", now, now, now)

    def _fence_id(self) -> str:
        with self.store.session() as session:
            return str(session.scalar(select(LeaseRow.fence_id)
                                      .where(LeaseRow.name == self.name)) or "")

    @property
    def fence(self) -> tuple[str, int]:
        """What the holder sends fed with every mutating call: (lease id, generation)."""
        return self.fence_id, self.generation

    def acquire(self, *, timeout: float | None,
                on_wait: Callable[[LeaseInfo], None] | None = None,
                poll: float = 1.0, stop: threading.Event | None = None) -> None:
        """Wait for the lease (None: forever); LeaseHeld after `timeout` seconds.

        `on_wait` is called when we start waiting and whenever the holder changes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shown: str | None = None
        while True:
            held = self.try_acquire()
            if held is None:
                self.lost.clear()
                self._start_renewing()
                return
            if on_wait is not None and held.holder != shown:
                on_wait(held)
                shown = held.holder
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseHeld(held, self.clock())
            wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            if stop is None:
                time.sleep(wait)
            elif stop.wait(wait):  # asked to stop while waiting
                raise LeaseHeld(held, self.clock())

    def renew(self) -> bool:
        """Extend our lease; False (and `lost` set) when someone else has it now."""
        now = self.clock()
        with self.store.session() as session:
            done = session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
                .values(renewed_at=now, expires_at=now + timedelta(seconds=self.ttl)))
            ok = getattr(done, "rowcount", 0) == 1
        if not ok:
            self.lost.set()
        return ok

    def _start_renewing(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # the store is briefly unavailable: try again next tick
                continue

    def release(self) -> None:
        """Stop renewing and give the lease back (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        # Kept, emptied: its generation must survive for the next holder's fencing token.
        now = self.clock()
        with self.store.session() as session:
            session.execute(update(LeaseRow).where(LeaseRow.name == self.name,
                                                   LeaseRow.holder == self.holder)
                            .values(holder="", expires_at=now, renewed_at=now))

    def holds(self) -> bool:
        """True when the store says we hold the lease now."""
        info = self.read()
        return info is not None and info.holder == self.holder and not self.lost.is_set()


def current_holder(store: Store, name: str = DEFAULT_NAME) -> LeaseInfo | None:
    """Who holds the lease (for `reconcile status`); None when free (or released)."""
    with store.session() as session:
        row = session.scalars(select(LeaseRow).where(LeaseRow.name == name)).first()
        if row is None or not row.holder:
            return None
        return LeaseInfo(row.holder, row.acquired_at, row.renewed_at, row.expires_at,
                         int(row.generation or 0))
