"""Per-address holds (patent E8/E9), shared by every fed node, and the in-flight counts that
make them honest.

A hold is only worth something if, once the hold call has returned, nothing more is
delivered for the held addresses *by any node*: the reconciler flips the directory right
after, and a delivery that started before the hold and finishes after the flip would put
mail in the old mailbox (breaking invariant 2). So:

- holds live in the shared database (``shared_db.py``), every change bumps the holds
  version, and each node keeps an in-memory copy that ``node_agent.py`` reloads when the
  version moves; ``is_held`` reads only that copy (the delivery scheduler calls it and
  ``begin`` in one synchronous stretch on the event loop, so it must stay cheap);
- ``wait_idle`` returns only when every live node has loaded the hold's version and has no
  delivery in flight for a held address (``nodes.py``), the hold protocol of
  docs/fed-multinode.md;
- fencing: a node whose copy is older than its lease (database unreachable, process
  paused) treats *everything* as held, because a holder elsewhere may already have counted
  it dead and flipped.

A hold on an address covers its aliases: at hold time it is expanded, in the same
transaction, to the physical address it routes to and every address routing there, and
the physical stays held, so an alias added during the hold is held too. Holds survive
restarts (they are rows, and a node loads them before delivering anything).

Release order: when a hold is released, the mailboxes its addresses now route to get one
delivery at a time until this node's backlog for them is delivered, so held mail arrives
in arrival order (queue ids sort by arrival); other mailboxes keep parallel delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select

from mailferry.mail.addresses import split_physical

from ..queue.store import Store
from . import shared_db as t
from .directory import Directory, DirectoryConflict, Snapshot, read_snapshot, upsync_missing
from .nodes import NodeRegistry
from .shared_db import SharedDB, bump, counters

log = logging.getLogger("fed.holds")


class HoldRefused(DirectoryConflict):
    """E8 negative: the target's up-sync does not list every address to hold (HTTP 409)."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass
class _Drain:
    """Addresses released together and the mailboxes they route to now."""

    released: set[str]
    serialised: set[str]
    until: float


class Holds:
    """Held addresses (shared, cached here) and in-flight delivery counts (this node)."""

    def __init__(self, shared: SharedDB, directory: Directory, registry: NodeRegistry,
                 mirror: Store | None = None, waiting: Callable[[str], int] | None = None,
                 drain_limit: float = 600.0) -> None:
        self.shared = shared
        self.directory = directory
        self.registry = registry
        self.mirror = mirror
        self.waiting = waiting
        self.drain_limit = drain_limit
        self.held: dict[str, float] = {}        # hold as asked for: address -> since
        self.covered: dict[str, set[str]] = {}  # every held address -> holds covering it
        self.covering: dict[str, list[str]] = {}  # hold -> the addresses it covers
        self.loaded = -1                        # holds version of the copy
        self.asked: dict[str, int] = {}         # address -> version its hold was written at
        self.fresh_until = 0.0                  # monotonic; see node_agent.py
        self.blocking: list[str] = []           # nodes the last wait_idle waited for
        self.lasted: dict[str, float] = {}      # how long the holds of the last release lasted
        self.inflight: Counter[str] = Counter()
        self.drains: list[_Drain] = []
        self.serialised: set[str] = set()
        self._drain_checked = 0.0
        self.on_change: Callable[[], None] = lambda: None  # wakes the node agent
        # Wakes the delivery scheduler when a serialised mailbox is free again (a scheduler
        # that parks what is_held refused looks at it again only when woken).
        self.on_slot: Callable[[], None] = lambda: None
        # How long wait_idle sleeps between two reads of the nodes table when nothing wakes
        # it: 50 ms when polling; the node agent makes it its safety poll while its
        # LISTEN connection is up (acknowledgements then wake it, see nodes_moved).
        self.ack_poll: Callable[[], float] = lambda: 0.05
        self._wake = asyncio.Event()  # set (and replaced) when a waiter should look again

    # -- the delivery scheduler's questions (synchronous, in memory) ------------------
    def fresh(self) -> bool:
        """Is this node's copy recent enough to deliver on? (fencing)"""
        return time.monotonic() < self.fresh_until

    def is_held(self, *addresses: str) -> bool:
        """True if a delivery for these addresses must not start now: one is held, this
        node's view is stale, or it is a just-released mailbox with a delivery in flight."""
        if not self.fresh():
            return True
        for address in addresses:
            if address in self.covered:
                return True
            if address in self.serialised and self.inflight.get(address, 0):
                return True
        return False

    def begin(self, addresses: Iterable[str]) -> None:
        """A delivery for these addresses starts (call right after checking is_held)."""
        self.inflight.update(addresses)

    async def end(self, addresses: Iterable[str]) -> None:
        """A delivery for these addresses has finished, successfully or not."""
        addresses = list(addresses)
        if not self.fresh():
            # Only possible for a delivery that outlived this node's lease (see
            # docs/fed-multinode.md, "a paused node"): say so, an admin may want to look.
            log.warning("delivery for %s ended while this node's view was stale",
                        ", ".join(addresses))
        self.inflight.subtract(addresses)
        self.inflight += Counter()  # drop zero counts
        if any(a in self.covered for a in addresses):
            self.on_change()  # an acknowledgement may be owed now; otherwise stay quiet
        if any(a in self.serialised for a in addresses):
            self.on_slot()
        self.nodes_moved()

    def nodes_moved(self) -> None:
        """Wake every wait_idle now: a node acknowledged (its NOTIFY), a delivery ended, or
        the listener (re)connected and may have missed acknowledgements."""
        self._wake.set()
        self._wake = asyncio.Event()

    def busy(self, addresses: Iterable[str]) -> int:
        """Deliveries in flight on this node for these addresses."""
        return sum(self.inflight.get(a, 0) for a in addresses)

    def busy_held(self) -> int:
        """Deliveries in flight on this node for any held address."""
        return self.busy(self.covered)

    def covers(self, address: str) -> list[str]:
        """Every address the hold on `address` holds (itself included)."""
        return self.covering.get(address, [])

    # -- hold and release: write the shared database, then reload ------------------
    def hold(self, addresses: Iterable[str], require_upsync: tuple[str, str | None] | None = None
             ) -> dict[str, float]:
        """Hold the addresses and what they cover (an existing hold keeps its start time);
        return their starts. With `require_upsync` = (system, physical or None), refuse
        (HoldRefused) unless that system's latest up-sync lists every covered address."""
        addresses = list(addresses)
        now = time.time()
        with self.shared.write() as db:
            cover = _expand(db, addresses)
            if require_upsync is not None:
                _check_upsync(db, cover, *require_upsync)
            h = t.holds
            existing = {(str(r.address), str(r.origin)): float(r.since) for r in db.execute(
                select(h).where(h.c.origin.in_(addresses)))}
            since = {o: existing.get((o, o), now) for o in addresses}
            new = [{"address": a, "origin": o, "since": since[o]}
                   for o, covered in cover.items() for a in sorted(covered)
                   if (a, o) not in existing]
            if new:
                db.execute(insert(h), new)
                version = bump(db, "holds_version")
            else:
                version = counters(db)["holds_version"]
        for address in addresses:
            self.asked[address] = max(self.asked.get(address, 0), version)
        self.refresh()
        return since

    def release(self, addresses: Iterable[str]) -> list[str]:
        """Clear the holds asked for on these addresses; return those that were held. An
        address only covered by another hold stays held until that one is released."""
        addresses = list(addresses)
        h = t.holds
        with self.shared.write() as db:
            since = {str(a): float(s) for a, s in db.execute(select(h.c.origin, h.c.since).where(
                h.c.origin.in_(addresses), h.c.address == h.c.origin))}
            if db.execute(delete(h).where(h.c.origin.in_(addresses))).rowcount:
                bump(db, "holds_version")
        released = sorted(since)
        now = time.time()
        self.lasted = {a: max(0.0, now - since[a]) for a in released}
        for address in released:
            self.asked.pop(address, None)
        # Reload the directory with the holds: released mail must go where the directory
        # points *now*, flips made through other nodes included.
        self.refresh()
        return [a for a in addresses if a in released]

    async def wait_idle(self, addresses: list[str], timeout: float) -> bool:
        """Wait until every live node has loaded the holds of these addresses and has no
        delivery in flight for a held address; False on timeout."""
        target = max((self.asked.get(a, self.loaded) for a in addresses), default=self.loaded)
        deadline = time.monotonic() + timeout
        while True:
            woken = self._wake  # taken before the read: a wake-up during it is not lost
            self.on_change()  # our own agent acknowledges at once
            if self.busy(addresses) == 0:
                self.blocking = await asyncio.to_thread(self.registry.blocking, target)
                if not self.blocking:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(left, self.ack_poll()))

    def why_busy(self, addresses: list[str]) -> str:
        """Why the last wait_idle timed out, for the API caller."""
        busy = self.busy(addresses)
        if busy:
            return f"{busy} deliveries are still in flight on this node"
        return f"nodes {', '.join(self.blocking)} have not confirmed the hold"

    # -- loading the copy ---------------------------------------------------------------
    def refresh(self) -> None:
        """Read and apply the shared state now (blocking: for admin calls on the loop)."""
        self.apply(read_snapshot(self.shared, self.directory.loaded, self.loaded))

    def apply(self, snap: Snapshot) -> None:
        """Apply a snapshot to the directory and holds copies (on the loop). The directory
        first: a release must find every flip committed before it."""
        self.directory.load(snap)
        version = snap.counters["holds_version"]
        if snap.holds is None or version <= self.loaded:
            # Unchanged, or read before a newer load (hold/release reload synchronously).
            self.loaded = max(self.loaded, version)
            return
        before = set(self.covered)
        self.held = {}
        self.covered = {}
        covering: dict[str, list[str]] = {}
        for address, origin, since in snap.holds:
            self.covered.setdefault(address, set()).add(origin)
            covering.setdefault(origin, []).append(address)
            if address == origin:
                self.held[address] = since
        self.covering = {o: sorted(c) for o, c in covering.items()}
        self.loaded = version
        self._write_mirror()
        released = before - set(self.covered)
        if released:
            self._start_drain(released)

    def _write_mirror(self) -> None:
        # The node-local queue queries skip held recipients with a `holds` table in the
        # local store (see spool.py): keep it equal to the covered addresses.
        if self.mirror is None:
            return
        with self.mirror.transaction() as db:
            db.execute("DELETE FROM holds")
            db.executemany("INSERT INTO holds (address, since) VALUES (?, ?)",
                           [(a, min((self.held.get(o, 0.0) for o in origins), default=0.0))
                            for a, origins in self.covered.items()])

    # -- release order -------------------------------------------------------------------
    def _start_drain(self, released: set[str]) -> None:
        mailboxes = {self.directory.lookup(a) or a for a in released if not split_physical(a)}
        self.drains.append(_Drain(released, released | mailboxes,
                                  time.monotonic() + self.drain_limit))
        self.serialised = set().union(*(d.serialised for d in self.drains))

    def drain_check(self) -> None:
        """Stop serialising the mailboxes whose released backlog is delivered here."""
        now = time.monotonic()
        if not self.drains or now - self._drain_checked < 0.5:
            return  # the queue queries below are not free: twice a second is enough
        self._drain_checked = now
        waiting = self.waiting or (lambda _a: 0)
        for drain in self.drains:
            # An address whose released backlog is out stays out: new mail needs no order.
            drain.released = {a for a in drain.released if waiting(a)}
        self.drains = [d for d in self.drains if now < d.until and d.released]
        self.serialised = set().union(*(d.serialised for d in self.drains))


def _expand(db: Connection, addresses: list[str]) -> dict[str, set[str]]:
    """Per address: itself, the physical it routes to now, and every address routing there."""
    d = t.directory
    physical = {str(a): str(p) for a, p in db.execute(
        select(d.c.address, d.c.physical).where(d.c.address.in_(addresses)))}
    for address in addresses:
        if split_physical(address):
            physical[address] = address
    targets = set(physical.values())
    aliases: dict[str, set[str]] = {}
    for a, p in db.execute(select(d.c.address, d.c.physical).where(d.c.physical.in_(targets))):
        aliases.setdefault(str(p), set()).add(str(a))
    cover: dict[str, set[str]] = {}
    for address in addresses:
        mailbox = physical.get(address)
        cover[address] = {address} | ({mailbox} | aliases.get(mailbox, set())
                                      if mailbox else set())
    return cover


def _check_upsync(db: Connection, cover: dict[str, set[str]], system: str,
                  physical: str | None) -> None:
    """E8: the target's latest up-sync must list every access address the hold covers."""
    wanted = sorted({a for covered in cover.values() for a in covered if not split_physical(a)})
    missing = upsync_missing(db, system, wanted, physical)
    if missing is None:
        raise HoldRefused(f"no up-sync received from system {system}: not holding", wanted)
    if missing:
        where = f" for {physical}" if physical else ""
        raise HoldRefused(f"the latest up-sync of {system} does not list{where}: "
                          f"{', '.join(missing)}; not holding", missing)
