"""Delivery: per-destination queues that resolve each recipient at the last moment.

Invariant 2 says a message lands in the mailbox the directory names *at delivery time*, so
the route is never fixed at reception. Pending recipients live in memory (loaded from the
store at start, then fed by the spool's group commit) and move through three stages:

1. *Scheduler* (one task): recipients whose next try is due are routed (a physical address
   routes to itself, any other address through the directory, an address of a domain fed
   does not serve to the ``--smarthost``) and appended to their destination's queue.
   Held ones are parked until a release (or any control change) wakes the scheduler.
2. *Destination queues*, one per system and one for the smarthost, each with at most
   ``concurrency`` connections. A slow, hanging or refusing system only ties up its own
   connections: mail for the others keeps flowing.
3. *Connection workers* take the next message's recipients from their queue and, in one
   synchronous stretch (no ``await``), check the holds, resolve the route *again* (a flip
   may have happened while the recipient waited in the queue; if it now goes elsewhere it
   goes back to the scheduler) and register the delivery in flight (``holds.begin``). Then
   one SMTP/LMTP transaction carries the message to all those recipients, on a connection
   kept open for the next message (``smtpclient.py``). LMTP answers per recipient.

Duplicate elimination (as Postfix does): when two recipients of one message resolve to the
same physical address (an address and its alias, say), the mailbox gets the message once:
in one transaction the physical is a single RCPT and the second recipient is logged as a
``duplicate`` of the first; across transactions the second waits while the first is in
flight and is marked done without a second copy once the first has been delivered.

Outcome per recipient: 2xx -> done; 5xx from the smarthost -> a copy goes to the shunt
folder for the admin and the sender gets a DSN (``bounce.py``), itself queued durably like
any message; anything else (4xx, refused or broken connection, timeout, unknown system) ->
retry after a back-off that doubles from ``retry_base`` up to ``retry_max``, with jitter
(``mailferry.mail.backoff``), until the message is older than ``queue_lifetime``:
then it fails like a
5xx (DSN status 4.4.7). A connection that breaks during LMTP's per-recipient replies keeps
the replies already received (those recipients are done); only the rest get the error. A
queue file that fails its checksum when read for delivery is never sent: it goes to
quarantine (``spool.py``). Each recipient of a transaction gets exactly one outcome, even
when recording one raises (``Job.settled``): a done recipient is never put back, nor
counted off twice.

A 5xx from a *managed* system (one fed routes to by its own directory) for a physical
address the directory places there is not the sender's problem (DESIGN invariant 9): the
system and mailferry disagree, typically a Postfix smtpd still serving fed's session from
tables older than the change (docs/postfix-dovecot.md). It is deferred like a 4xx, logged
as ``refused`` in the delivery log, counted in ``fed_system_refusals`` and warned about,
and the connection that carried it is retired so that the retry gets a fresh session. Only
what no retry can fix (the message itself: too big, bad content) is shunted at once.

Connections remember the system's *generation* when they were opened; a refresh (``POST
/v1/systems/{name}/refresh``, called by the reconciler whenever it changed the system's
tables) bumps it, and a worker retires its connection before the next transaction.

Outcomes go to the store in batches (``Spool`` buffers them), so a delivery costs no fsync
of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailferry.mail.addresses import (
    domain_key,
    domain_of,
    is_valid,
    normalize,
    split_physical,
)
from mailferry.mail.backoff import backoff

from ..queue.queuefile import BadQueueFile, new_queue_id
from ..queue.spool import PendingRecipient, Spool
from ..queue.store import Store
from ..routing.directory import Directory, System
from ..routing.holds import Holds
from ..telemetry import metrics
from .bounce import Failure, build_dsn, should_bounce
from .smtpclient import ClientError, Connection, Reply

log = logging.getLogger("fed.delivery")

SMARTHOST = "@smarthost"  # destination key of the smarthost ('@' is never in a system name)
INLINE_READ = 1 << 20  # messages up to this size are read on the loop (cheaper than a thread)


@dataclass(frozen=True)
class DeliverySettings:
    """Tunables of the delivery queues."""

    retry_base: float = 1.0  # like Postfix's minimal_backoff_time
    retry_max: float = 600.0  # like Postfix's maximal_backoff_time
    concurrency: int = 8  # connections per destination
    timeout: float = 30.0
    helo_name: str = "fed.invalid"
    smarthost: tuple[str, int] | None = None
    domains: tuple[str, ...] = ()
    queue_lifetime: float = 5 * 86400.0
    idle_close: float = 5.0  # close a destination connection unused this long
    max_rcpts: int = 50  # recipients of one message per transaction


@dataclass(frozen=True)
class Route:
    """Where one recipient goes now, or why it cannot go anywhere."""

    physical: str | None = None
    system: System | None = None
    failure_code: int = 0
    failure: str = ""
    dest: str = ""  # destination queue key


@dataclass
class Job:
    """One transaction to one destination: one message, one or more recipients."""

    item: PendingRecipient  # the first recipient (envelope data)
    primary: dict[str, PendingRecipient] = field(default_factory=dict)  # physical -> rcpt
    dups: dict[str, list[PendingRecipient]] = field(default_factory=dict)
    watched: list[list[str]] = field(default_factory=list)
    settled: set[int] = field(default_factory=set)  # id() of recipients with an outcome


@dataclass
class Destination:
    """A system (or the smarthost) and its queue of recipients waiting for a connection."""

    key: str
    system: System
    queue: deque[PendingRecipient] = field(default_factory=deque)
    workers: int = 0
    # The idle workers, each waiting on its own future. Why not one Event: setting it
    # woke every idle worker for each queued message (16 task switches and 16 new timers
    # a message at --workers 16, when one of them takes it), and kept all of them from
    # ever idling out.
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def wake_one(self) -> bool:
        """Hand the queue's news to one idle worker, the one idle the shortest (its
        connection is the freshest; the others may reach idle_close and close theirs);
        False if none was idle."""
        while self.waiters:
            waiter = self.waiters.pop()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    def wake_all(self) -> None:
        """Every idle worker looks again (stopping)."""
        while self.wake_one():
            pass


class Clock(Protocol):
    """Where the scheduler reads the time: the ``time`` module itself, or a test's fake
    clock (retries, back-off and the queue lifetime then run without waiting)."""

    def time(self) -> float:
        """Wall-clock seconds: due times and ages stored with the recipients."""
        ...

    def monotonic(self) -> float:
        """Seconds for intervals only (the periodic recheck)."""
        ...


class Deliverer:
    """The scheduler, the destination queues and their connection workers."""

    def __init__(self, store: Store, spool: Spool, directory: Directory, holds: Holds,
                 settings: DeliverySettings, clock: Clock = time) -> None:
        self._clock = clock
        self.store = store
        self.spool = spool
        self.directory = directory
        self.holds = holds
        self.settings = settings
        self._domains = {domain_key(d) for d in settings.domains}
        self._event = asyncio.Event()
        self._recheck = False
        self._ready: deque[PendingRecipient] = deque()
        self._deferred: list[tuple[float, int, PendingRecipient]] = []
        self._seq = itertools.count()
        self._parked: list[PendingRecipient] = []
        self._dup_wait: dict[str, list[PendingRecipient]] = {}
        self._left: Counter[str] = Counter()  # pending recipients per message
        self._delivered: dict[str, set[str]] = {}  # queue id -> physicals that took it
        self._inflight: Counter[tuple[str, str]] = Counter()  # (queue id, physical)
        self._attempting: Counter[tuple[str, str]] = Counter()  # (queue id, rcpt) in a job now
        self._dests: dict[str, Destination] = {}
        self._hints: dict[str, Destination] = {}  # rcpt -> where it went last time
        self._admin_held: set[str] = set()  # queue ids on admin hold (fed queue hold)
        self._deleted_seen = 0  # last 'deleted' row of the delivery log looked at
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        spool.on_queued = self.enqueue

    # -- feeding the scheduler ---------------------------------------------------------
    def load(self) -> int:
        """Take over the pending recipients in the store (at start); return their count."""
        rows = self.store.query("SELECT MAX(id) AS n FROM deliveries")
        self._deleted_seen = int(rows[0]["n"] or 0)
        self._admin_held = {str(r["queue_id"])
                            for r in self.store.query("SELECT queue_id FROM admin_holds")}
        items = self.spool.pending()
        for item in items:
            self._left[item.queue_id] += 1
            self._push_deferred(item)
        for row in self.store.query(
                "SELECT DISTINCT d.queue_id, d.physical FROM deliveries d "
                "JOIN messages m ON m.queue_id = d.queue_id WHERE d.result = 'delivered'"):
            self._delivered.setdefault(str(row["queue_id"]), set()).add(str(row["physical"]))
        return len(items)

    def enqueue(self, items: list[PendingRecipient]) -> None:
        """New recipients, durably queued: deliver them now."""
        for item in items:
            self._left[item.queue_id] += 1
        self._ready.extend(items)
        self._event.set()

    def wake(self) -> None:
        """Something changed (release, flip, new system): look at parked mail again."""
        self._hints.clear()
        self._recheck = True
        self._event.set()

    def hold_message(self, queue_id: str) -> None:
        """An admin hold, known at once (the store's admin_holds row is written by the
        caller): no new attempt of `queue_id` starts from now on, one in flight goes on
        (like ``postsuper -h``). The scheduler's own look at the store comes a tick later."""
        self._admin_held.add(queue_id)

    def delivering(self, queue_id: str) -> set[str]:
        """The recipients of `queue_id` in a delivery attempt right now: taken for a
        connection, their outcome not yet recorded (`fed queue show`: in flight)."""
        return {rcpt for (qid, rcpt), n in self._attempting.items() if qid == queue_id and n}

    def parked(self) -> int:
        """Recipients the scheduler has parked (held address, admin hold, stale view): the
        decision not to deliver them, taken (tests wait for it instead of sleeping)."""
        return len(self._parked)

    def retrying(self) -> int:
        """Pending recipients that have failed at least once."""
        self.spool.write_outcomes()
        rows = self.store.query(
            "SELECT COUNT(*) AS n FROM recipients WHERE status = 'pending' AND attempts > 0"
        )
        return int(rows[0]["n"])

    def _push_deferred(self, item: PendingRecipient) -> None:
        heapq.heappush(self._deferred, (item.next_try, next(self._seq), item))

    # -- scheduler ------------------------------------------------------------------------
    async def run(self) -> None:
        """Route due recipients to their destinations until stop() is called."""
        last_recheck = self._clock.monotonic()
        while not self._stopping:
            self._event.clear()
            now = self._clock.time()
            while self._deferred and self._deferred[0][0] <= now:
                self._ready.append(heapq.heappop(self._deferred)[2])
            # Holds on physical addresses are not announced by a wake(): a 1 s recheck.
            if self._recheck or self._clock.monotonic() - last_recheck > 1.0:
                self._recheck = False
                self._hints.clear()
                last_recheck = self._clock.monotonic()
                self._resync()
                # Oldest first (by arrival time; a blank's queue id dates from when the
                # blank was made): a released mailbox gets its backlog in the order it
                # came, whichever stage had parked each message.
                self._ready.extend(sorted(self._parked,
                                          key=lambda item: (item.received_at, item.queue_id)))
                self._parked = []
            while self._ready:
                self._classify(self._ready.popleft())
            delay = 1.0
            if self._deferred:
                delay = max(0.005, min(1.0, self._deferred[0][0] - self._clock.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # no task a wake (wait_for makes one)
                    await self._event.wait()

    def _resync(self) -> None:
        """Pick up what the queue admin changed in the store (``fed queue``, see
        queueadmin.py): admin holds, recipients made due (release, flush), deletions."""
        # The store must not lag behind memory for this; index rows the spool holds back are
        # of messages never retried nor touched by the admin (whose writes caught up first),
        # so they need not be written for it (once a second, they would be most of them).
        self.spool.write_outcomes(index_all=False)
        self._admin_held = {str(r["queue_id"]) for r in self.store.query(
            "SELECT queue_id FROM admin_holds", catch_up=False)}
        now = self._clock.time()
        due: set[tuple[str, str]] = set()
        if self._deferred:  # only a recipient in back-off can be made due early
            due = {(str(r["queue_id"]), str(r["rcpt"])) for r in self.store.query(
                "SELECT queue_id, rcpt FROM recipients WHERE status = 'pending' "
                "AND attempts > 0 AND next_try <= ?", (now,), catch_up=False)}
        if due:
            keep = []
            for entry in self._deferred:
                item = entry[2]
                if (item.queue_id, item.rcpt) in due:
                    item.next_try = now
                    self._ready.append(item)
                else:
                    keep.append(entry)
            heapq.heapify(keep)
            self._deferred = keep
        rows = self.store.query(
            "SELECT id, queue_id FROM deliveries WHERE result = 'deleted' AND id > ? "
            "ORDER BY id", (self._deleted_seen,), catch_up=False)
        if rows:
            self._deleted_seen = int(rows[-1]["id"])
            self._drop({str(r["queue_id"]) for r in rows})

    def drop(self, queue_ids: set[str]) -> None:
        """Forget deleted messages at once (the control API's delete, on this node): the
        scheduler's own look at the delivery log comes a tick later, and a deferred
        recipient retried in between would deliver a message the admin deleted."""
        self._drop(queue_ids)

    def _drop(self, queue_ids: set[str]) -> None:
        """Forget, in memory, messages an admin deleted from the queue."""
        def keep(item: PendingRecipient) -> bool:
            return item.queue_id not in queue_ids

        self._ready = deque(filter(keep, self._ready))
        self._parked = list(filter(keep, self._parked))
        self._deferred = [e for e in self._deferred if keep(e[2])]
        heapq.heapify(self._deferred)
        for dest in self._dests.values():
            dest.queue = deque(filter(keep, dest.queue))
        for queue_id in queue_ids:
            self._left.pop(queue_id, None)
            self._delivered.pop(queue_id, None)
            self._dup_wait.pop(queue_id, None)
            self.spool.uncache(queue_id)
        log.info("dropped deleted or quarantined messages from delivery: %s",
                 ", ".join(sorted(queue_ids)))

    async def stop(self, grace: float) -> None:
        """Stop scheduling and let in-flight deliveries record their outcome."""
        self._stopping = True
        self._event.set()
        for dest in self._dests.values():
            dest.wake_all()
        tasks = list(self._tasks)
        if tasks:
            log.info("waiting for %d delivery tasks", len(tasks))
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:  # a hanging system: its recipients stay pending for next time
                task.cancel()
            if late:
                log.warning("cancelled %d deliveries still waiting after %.0f s", len(late),
                            grace)
                await asyncio.wait(late, timeout=5)

    def route(self, rcpt: str) -> Route:
        """Resolve a recipient now: physical address, directory, or the smarthost."""
        physical = rcpt if split_physical(rcpt) else self.directory.lookup(rcpt)
        if physical is None:
            smarthost = self.settings.smarthost
            if smarthost is not None and domain_key(domain_of(rcpt)) not in self._domains:
                return Route(rcpt, System("smarthost", smarthost[0], smarthost[1], "smtp"),
                             dest=SMARTHOST)
            return Route(failure_code=550, failure=f"550 5.1.1 <{rcpt}>: not in the directory")
        split = split_physical(physical)
        system = self.directory.system(split[0]) if split else None
        if system is None:
            return Route(physical, failure=f"no system registered for {physical}")
        return Route(physical, system, dest=system.name)

    def _classify(self, item: PendingRecipient) -> None:
        """Put one due recipient into its destination's queue (or park it)."""
        if self.holds.is_held(item.rcpt) or item.queue_id in self._admin_held:
            self._parked.append(item)
            return
        # Only a hint: the worker routes again, from the store, right before sending.
        dest = self._hints.get(item.rcpt)
        if dest is None:
            route = self.route(item.rcpt)
            if route.system is None:
                self._spawn(self._unroutable(item, route))
                return
            dest = self._dests.get(route.dest)
            if dest is None:
                dest = self._dests[route.dest] = Destination(route.dest, route.system)
            dest.system = route.system
            if len(self._hints) > 10000:
                self._hints.clear()
            self._hints[item.rcpt] = dest
        dest.queue.append(item)
        if not dest.wake_one() and dest.workers < self.settings.concurrency:
            dest.workers += 1
            self._spawn(self._worker(dest))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connection workers --------------------------------------------------------------
    async def _worker(self, dest: Destination) -> None:
        """Deliver from one destination queue over one reused connection."""
        conn: Connection | None = None
        try:
            while not self._stopping:
                job = self._take(dest)
                if job is None:
                    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    dest.waiters.append(waiter)
                    try:
                        async with asyncio.timeout(self.settings.idle_close):
                            await waiter
                    except TimeoutError:
                        # Woken and timed out at once: the queue says which came first.
                        if not dest.queue:
                            break
                    finally:
                        if waiter in dest.waiters:  # not woken (a wake takes it off)
                            dest.waiters.remove(waiter)
                    continue
                conn = await self._attempt(dest, job, conn)
        finally:
            dest.workers -= 1
            if conn is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await conn.quit()
                conn.close()

    def _take(self, dest: Destination) -> Job | None:
        """The next message's recipients, checked and registered in flight (no await!)."""
        while dest.queue:
            first = dest.queue.popleft()
            group = [first]
            while (dest.queue and dest.queue[0].queue_id == first.queue_id
                   and len(group) < self.settings.max_rcpts):
                group.append(dest.queue.popleft())
            job = Job(first)
            for item in group:
                if self.holds.is_held(item.rcpt) or item.queue_id in self._admin_held:
                    self._parked.append(item)
                    continue
                route = self.route(item.rcpt)
                if route.dest != dest.key or route.physical is None or route.system is None:
                    self._hints.pop(item.rcpt, None)
                    self._ready.append(item)  # moved (flip) or gone: route it afresh
                    self._event.set()
                    continue
                physical = route.physical
                watched = list(dict.fromkeys([item.rcpt, physical]))
                if self.holds.is_held(*watched):
                    self._parked.append(item)
                    continue
                if physical in job.primary:
                    job.dups.setdefault(physical, []).append(item)
                    self._attempting[(item.queue_id, item.rcpt)] += 1
                elif self._inflight[(item.queue_id, physical)]:
                    self._dup_wait.setdefault(item.queue_id, []).append(item)
                    continue
                elif physical in self._delivered.get(item.queue_id, ()):
                    self._duplicate(item, physical)
                    continue
                else:
                    job.primary[physical] = item
                    self._inflight[(item.queue_id, physical)] += 1
                    self._attempting[(item.queue_id, item.rcpt)] += 1
                dest.system = route.system
                self.holds.begin(watched)
                job.watched.append(watched)
            if job.primary:
                return job
        return None

    async def _attempt(self, dest: Destination, job: Job, conn: Connection | None
                       ) -> Connection | None:
        """Send one job (reusing `conn` if it still points at the system); record it."""
        physicals = list(job.primary)
        try:
            try:
                data = await self._read(job.item)
            except BadQueueFile as exc:  # never relay what is not what was acknowledged
                await self.spool.quarantine(job.item.queue_id, exc.reason)
                self._drop({job.item.queue_id})
                return conn
            except OSError as exc:
                log.error("%s: cannot read the spool file: %s", job.item.queue_id, exc,
                          extra={"queue_id": job.item.queue_id})
                replies = dict.fromkeys(physicals, Reply(0, f"spool file unreadable: {exc}"))
            else:
                replies, conn = await self._transact(dest.system, conn, job, data)
                if conn is not None and any(self._inconsistent(dest, r) for r in replies.values()):
                    await conn.quit()  # maybe served from old tables: retry on a new session
                    conn = None
            await self._record(dest, job, replies)
        except Exception:
            log.exception("delivery of %s failed unexpectedly", job.item.queue_id,
                          extra={"queue_id": job.item.queue_id})
            # Only the recipients without an outcome yet: a done one put back would be
            # delivered again and counted off twice (forget() too early: a loss).
            for item in [*job.primary.values(), *(d for ds in job.dups.values() for d in ds)]:
                if id(item) not in job.settled:
                    self._defer(item, None, None, Reply(0, "internal error, see fed log"), [])
        finally:
            for physical in physicals:
                self._inflight[(job.item.queue_id, physical)] -= 1
                if not self._inflight[(job.item.queue_id, physical)]:
                    del self._inflight[(job.item.queue_id, physical)]
            for item in [*job.primary.values(), *(d for ds in job.dups.values() for d in ds)]:
                key = (item.queue_id, item.rcpt)
                self._attempting[key] -= 1
                if not self._attempting[key]:
                    del self._attempting[key]
            waiting = self._dup_wait.pop(job.item.queue_id, None)
            if waiting:
                self._ready.extend(waiting)
                self._event.set()
            for watched in job.watched:
                await self.holds.end(watched)
        return conn

    async def _read(self, item: PendingRecipient) -> bytes:
        if item.size and item.size <= INLINE_READ:
            return self.spool.read(item.queue_id)
        return await asyncio.to_thread(self.spool.read, item.queue_id)

    async def _transact(self, system: System, conn: Connection | None, job: Job, data: bytes
                        ) -> tuple[dict[str, Reply], Connection | None]:
        """One transaction; a reused connection that turns out dead gets one fresh retry."""
        physicals = list(job.primary)
        endpoint = f"{system.host}:{system.port}"
        if conn is not None and (conn.broken or conn.endpoint != endpoint
                                 or conn.lmtp != (system.protocol == "lmtp")
                                 or conn.tls != (system.tls != "none")
                                 or conn.auth_user != system.auth_user
                                 or conn.generation != system.generation):
            await conn.quit()
            conn = None
        for fresh in (False, True):
            reused = conn is not None
            if conn is None:
                try:
                    conn = await Connection.for_system(system, self.settings.helo_name,
                                                       self.settings.timeout)
                except ClientError as exc:
                    return dict.fromkeys(physicals, exc.reply), None
                conn.generation = system.generation
            try:
                if not system.rcpt:
                    return await conn.send(job.item.mail_from, physicals, data), conn
                # A system that knows its mailboxes by address only (a hosted target): the
                # RCPT is the mailbox's address, the replies are read back per physical.
                rcpts = {physical: system.recipient(physical) for physical in physicals}
                replies = await conn.send(job.item.mail_from, list(rcpts.values()), data)
                return {p: replies[r] for p, r in rcpts.items()}, conn
            except ClientError as exc:
                data_sent = conn.data_sent
                conn.close()
                conn = None
                # The system may have closed an idle connection: one retry on a new one,
                # unless the message already went out (it may have been delivered).
                if not reused or fresh or data_sent:
                    return dict.fromkeys(physicals, exc.reply), None
        raise AssertionError("unreachable")

    # -- outcomes ------------------------------------------------------------------------
    async def _record(self, dest: Destination, job: Job, replies: dict[str, Reply]) -> None:
        """Turn the replies into done / failed (shunt + DSN) / retry."""
        system = dest.system.name
        failures: list[tuple[PendingRecipient, str | None, Reply, bool]] = []
        for physical, item in job.primary.items():
            reply = replies.get(physical, Reply(0, "no reply"))
            dups = job.dups.get(physical, [])
            if reply.ok:
                # Delivered, whatever happens while recording it: settled first, and
                # counted off exactly once (finally).
                job.settled.add(id(item))
                try:
                    self._delivered.setdefault(item.queue_id, set()).add(physical)
                    self.spool.mark_done(item.queue_id, item.rcpt)
                    self.spool.log_delivery(item.queue_id, item.rcpt, physical, system,
                                            item.message_id, "delivered", str(reply))
                    metrics.count_delivery("delivered", system, item.queue_id,
                                           item.received_at)
                    log.info("%s <%s> -> %s: %s", item.queue_id, item.rcpt, physical, reply,
                             extra={"queue_id": item.queue_id})
                finally:
                    self._finish(item)
                for dup in dups:
                    job.settled.add(id(dup))
                    self._duplicate(dup, physical, first=item.rcpt)
            elif reply.permanent and not self._inconsistent(dest, reply):
                failures += [(it, physical, reply, False) for it in [item, *dups]]
            else:
                refused = reply.permanent
                if refused:
                    log.warning("%s: %s refused <%s>, which fed's directory places there: %s; "
                                "deferred (mailferry and the system disagree: fix the system "
                                "or the directory; bounced only after the queue lifetime)",
                                item.queue_id, system, physical, reply,
                                extra={"queue_id": item.queue_id})
                for it in [item, *dups]:
                    expired = len(failures)
                    self._defer(it, physical, system, reply, failures,
                                result="refused" if refused else "deferred")
                    if len(failures) == expired:  # else _fail settles it
                        job.settled.add(id(it))
        if failures:
            await self._fail(failures, system, job.settled)

    @staticmethod
    def _inconsistent(dest: Destination, reply: Reply) -> bool:
        """A managed system's 5xx that a retry may fix: everything but the smarthost's and
        what concerns the message itself (RFC 3463 5.2.3, 5.3.4 size, 5.6.x content)."""
        if dest.key == SMARTHOST or not reply.permanent:
            return False
        status = reply.status
        if status is None:
            return reply.code != 552  # 552 without a status: "exceeded storage allocation"
        return not (status in ("5.2.3", "5.3.4") or status.startswith("5.6."))

    def _duplicate(self, item: PendingRecipient, physical: str, first: str = "") -> None:
        """Another recipient of this message already brought it to `physical`."""
        self.spool.mark_done(item.queue_id, item.rcpt)
        detail = f"same mailbox as <{first}>: delivered once" if first else (
            "same mailbox as an earlier recipient: delivered once")
        self.spool.log_delivery(item.queue_id, item.rcpt, physical, None, item.message_id,
                                "duplicate", detail)
        log.info("%s <%s> -> %s: duplicate, not delivered twice", item.queue_id, item.rcpt,
                 physical, extra={"queue_id": item.queue_id})
        self._finish(item)

    def _finish(self, item: PendingRecipient) -> None:
        """One recipient less; forget the message once none is left."""
        self._left[item.queue_id] -= 1
        if self._left[item.queue_id] <= 0:
            del self._left[item.queue_id]
            self._delivered.pop(item.queue_id, None)
            self.spool.forget(item.queue_id)

    def _defer(self, item: PendingRecipient, physical: str | None, system: str | None,
               reply: Reply, failures: list[tuple[PendingRecipient, str | None, Reply, bool]],
               result: str = "deferred") -> None:
        """Schedule the next attempt (back-off with jitter), or give up after the lifetime."""
        detail = str(reply)
        if self._clock.time() - item.received_at >= self.settings.queue_lifetime:
            failures.append((item, physical, reply, True))
            return
        item.attempts += 1
        delay = backoff(item.attempts, self.settings.retry_base, self.settings.retry_max)
        item.next_try = self._clock.time() + delay
        item.last_error = detail
        self.spool.mark_retry(item.queue_id, item.rcpt, item.attempts, item.next_try, detail)
        self.spool.log_delivery(item.queue_id, item.rcpt, physical, system, item.message_id,
                                result, detail)
        metrics.count_delivery(result, system, item.queue_id)
        log.info("%s <%s> -> %s deferred (retry in %.1fs): %s", item.queue_id, item.rcpt,
                 physical, delay, detail, extra={"queue_id": item.queue_id})
        self._push_deferred(item)
        self._event.set()

    async def _unroutable(self, item: PendingRecipient, route: Route) -> None:
        """No destination now: 5xx (not in the directory) fails, the rest is retried."""
        reply = Reply(route.failure_code, route.failure.removeprefix(
            f"{route.failure_code} ")) if route.failure_code else Reply(0, route.failure)
        failures: list[tuple[PendingRecipient, str | None, Reply, bool]] = []
        if reply.permanent:
            failures.append((item, route.physical, reply, False))
        else:
            self._defer(item, route.physical, None, reply, failures)
        if failures:
            await self._fail(failures, None)

    async def _fail(self, failures: list[tuple[PendingRecipient, str | None, Reply, bool]],
                    system: str | None, settled: set[int] | None = None) -> None:
        """Shunt a copy for the admin, queue one DSN per message, then record the failure."""
        by_message: dict[str, list[tuple[PendingRecipient, str | None, Reply, bool]]] = {}
        for failure in failures:
            by_message.setdefault(failure[0].queue_id, []).append(failure)
        for queue_id, group in by_message.items():
            first = group[0][0]
            try:
                paths = [await asyncio.to_thread(self.spool.shunt, queue_id, it.rcpt,
                                                 reply.code, _why(reply, expired))
                         for it, _, reply, expired in group]
                bounced = await self._bounce(first, group)
            except Exception as exc:
                log.exception("%s: cannot shunt or bounce; will retry", queue_id,
                              extra={"queue_id": queue_id})
                for it, physical, _, _ in group:
                    if settled is not None:
                        settled.add(id(it))
                    self._defer(it, physical, system, Reply(0, f"cannot bounce: {exc}"), [])
                continue
            note = f"; bounced to <{first.mail_from}>" if bounced else "; no bounce"
            for (it, physical, reply, expired), path in zip(group, paths, strict=True):
                why = _why(reply, expired)
                self.spool.mark_shunted(queue_id, it.rcpt, reply.code, why, path)
                self.spool.log_delivery(queue_id, it.rcpt, physical, system, it.message_id,
                                        "shunted", why + note)
                metrics.count_delivery("shunted", system, queue_id)
                log.warning("%s <%s> -> %s failed, shunted to %s%s: %s", queue_id, it.rcpt,
                            physical, path.name, note, why, extra={"queue_id": queue_id})
                if settled is not None:
                    settled.add(id(it))
                self._finish(it)

    async def _bounce(self, first: PendingRecipient,
                      group: list[tuple[PendingRecipient, str | None, Reply, bool]]) -> bool:
        """Queue a DSN to the envelope sender (durably); False when none is due."""
        sender = normalize(first.mail_from)
        if not should_bounce(sender):
            return False
        if not is_valid(sender):
            log.warning("%s: sender <%s> cannot get a bounce", first.queue_id, sender,
                        extra={"queue_id": first.queue_id})
            return False
        original = await asyncio.to_thread(self.spool.read, first.queue_id)
        dsn = build_dsn(
            reporting_mta=self.settings.helo_name, queue_id=first.queue_id, sender=sender,
            arrival=first.received_at, last_attempt=self._clock.time(),
            failures=[Failure(it.rcpt, physical, reply.code, reply.text or str(reply), expired)
                      for it, physical, reply, expired in group],
            original=original)
        dsn_id = new_queue_id()
        await self.spool.accept(dsn_id, "", [sender], dsn, None)
        log.info("%s: bounce %s queued for <%s>", first.queue_id, dsn_id, sender,
                 extra={"queue_id": first.queue_id})
        return True

    def log_rows(self, rcpt: str | None, since: float | None, limit: int
                 ) -> list[dict[str, object]]:
        """Delivery log rows, oldest first, optionally for one recipient / after a time."""
        self.spool.write_outcomes()
        sql = "SELECT * FROM deliveries WHERE 1=1"
        params: list[object] = []
        if rcpt:
            sql += " AND (rcpt = ? OR physical = ?)"
            params += [rcpt, rcpt]
        if since is not None:
            sql += " AND at >= ?"
            params.append(since)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [dict(r) for r in self.store.query(sql, tuple(params))]


def _why(reply: Reply, expired: bool) -> str:
    return f"queue lifetime expired; last error: {reply}" if expired else str(reply)
