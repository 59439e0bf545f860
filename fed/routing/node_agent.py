"""The node agent: keeps this node's copy of the shared state current and tells the others.

Why a loop of its own: the hot path (RCPT checks, the delivery scheduler) reads only
in-memory copies (``directory.py``, ``holds.py``), so something must notice changes made
through other nodes. It wakes on a notice from PostgreSQL (``notify.py``: LISTEN/NOTIFY,
the change announced itself at commit), else every ``safety_poll`` seconds; without a
listener (SQLite, ``--no-node-notify``, or while the listener reconnects) every ``poll``
seconds. Awake, it reads the version counters (one small SELECT); when one moved, when an
acknowledgement is owed, or every quarter lease, it runs a *round*:

1. note ``t0`` (monotonic), then write this node's heartbeat (database clock);
2. read the counters and whatever moved (one snapshot), apply it on the event loop;
3. extend the fencing deadline: ``fresh_until = t0 + lease``;
4. write ``holds_seen`` = the loaded holds version and, if no delivery of a held address
   is in flight here, ``idle_for`` = that version (the acknowledgement a hold waits for).

Why this order is safe (docs/fed-multinode.md has the full argument): a view read in
step 2 was read after a heartbeat committed in step 1, so a holder that finds this node's
heartbeat older than ``dead_after`` (> lease) knows that view has expired here too, and
this node will not start a delivery on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from .directory import Directory, read_snapshot
from .holds import Holds
from .nodes import NodeRegistry
from .notify import Listener, can_listen
from .shared_db import COUNTERS, SharedDB, counters

log = logging.getLogger("fed.node")


class NodeNameInUse(Exception):
    """Another live node already uses this node's name."""

class NodeAgent:
    """Heartbeat, refresh and acknowledgement of one fed node."""

    def __init__(self, name: str, shared: SharedDB, directory: Directory, holds: Holds,
                 lease: float, dead_after: float, info: str = "", poll: float = 0.1,
                 on_refresh: Callable[[], None] = lambda: None, notify: bool = True,
                 safety_poll: float = 5.0) -> None:
        self.name = name
        self.shared = shared
        self.directory = directory
        self.holds = holds
        self.registry = NodeRegistry(shared)
        self.lease = lease
        self.dead_after = dead_after
        self.info = info
        self.poll = poll
        self.safety_poll = safety_poll
        self.on_refresh = on_refresh
        self.started_at = time.time()
        self.control: str | None = None  # HOST:PORT of the control API, once bound
        self.acked = (0, 0)  # (holds_seen, idle_for) last written
        self._last_round = 0.0
        self._kick = asyncio.Event()
        self._stopping = False
        self._failing = False
        self._fresh = True
        self._reread = False  # the listener (re)connected: run a round whatever the counters
        self.notify_off: str | None = None if notify else "--no-node-notify"
        if self.notify_off is None:
            self.notify_off = can_listen(shared)
        self.listener = None if self.notify_off is not None else Listener(
            shared, name, self._notice, self._listened, self.kick, check=safety_poll)
        holds.on_change = self.kick
        holds.ack_poll = self._ack_poll

    def kick(self) -> None:
        """Something changed here (a hold, a delivery ended): act now, not at the next poll."""
        self._kick.set()

    def notified(self) -> bool:
        """Is this node woken by notices now (a listener connected)?"""
        return self.listener is not None and self.listener.listening

    def _notice(self, key: str) -> None:
        if key in COUNTERS:
            self.kick()
        elif key == "nodes":
            self.holds.nodes_moved()

    def _listened(self) -> None:
        # Notices sent while the listener was away are lost: look at everything once.
        self._reread = True
        self.kick()
        self.holds.nodes_moved()

    def _ack_poll(self) -> float:
        return self.safety_poll if self.notified() else 0.05

    def _interval(self) -> float:
        """How long to sleep when nothing wakes the loop: the safety poll with a listener,
        the poll without; never past the next round (heartbeat, fencing deadline), and at
        most 0.5 s while released mailboxes are serialised (drain_check). At least 0.1 s
        (or the interval, if shorter): a round that is due but fails (the database down)
        is retried at that pace, not in a busy loop."""
        interval = self.safety_poll if self.notified() else self.poll
        if self.holds.drains:
            interval = min(interval, 0.5)
        until_round = self._last_round + self.lease / 4 - time.monotonic()
        return max(min(interval, 0.1), min(interval, until_round))

    async def start(self) -> None:
        """Register, load the shared state and acknowledge it; before any delivery.

        Refuses (NodeNameInUse) a name that a live node with another identity holds: two
        nodes writing one row would acknowledge holds for each other."""
        now, states = await asyncio.to_thread(self.registry.states)
        for state in states:
            if state.name == self.name and state.alive(now) and state.info != self.info:
                raise NodeNameInUse(f"node name {self.name!r} is used by a live node "
                                    f"({state.info}); give this one another --node-name")
        await self._round()

    async def run(self) -> None:
        """Poll (and listen) until stop()."""
        listening = None if self.listener is None else asyncio.create_task(
            self.listener.run(), name="node-notify")
        try:
            await self._loop()
        finally:
            if listening is not None:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            self._kick.clear()
            try:
                await self._tick()
                if self._failing:
                    log.info("shared database reachable again")
                self._failing = False
            except Exception as exc:  # the DB is down: keep trying; fencing stops delivery
                if not self._failing:
                    log.error("shared database unreachable (%s); deliveries stop when the "
                              "lease runs out, mail is still accepted", exc)
                self._failing = True
            fresh = self.holds.fresh()
            if fresh != self._fresh:
                if fresh:
                    log.info("view refreshed: deliveries resume")
                else:
                    log.warning("view older than the lease (%.1f s): no delivery starts until "
                                "the shared database answers", self.lease)
                self._fresh = fresh
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self._interval())

    async def announce(self, control: str) -> None:
        """Record this node's control endpoint in its row (``fed queue`` reaches every
        node through it). Only that column is written: a whole heartbeat from here could
        race with the loop's acknowledgement and write an older ``idle_for``."""
        self.control = control
        await asyncio.to_thread(self.registry.set_control, self.name, control)

    async def stop(self) -> None:
        """Stop polling; if nothing is in flight here, tell the others not to wait for us."""
        self._stopping = True
        self._kick.set()
        if not self.holds.inflight:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.registry.leave, self.name)

    async def _tick(self) -> None:
        due = self._reread or time.monotonic() - self._last_round >= self.lease / 4
        self._reread = False
        if not due:
            now = await asyncio.to_thread(self._counters)
            loaded = (*self.directory.loaded, self.holds.loaded)
            due = (now["version"], now["systems_version"], now["holds_version"]) != loaded
        if due:
            await self._round()
        else:
            await self._acknowledge()
        self.holds.drain_check()

    def _counters(self) -> dict[str, int]:
        with self.shared.read() as db:
            return counters(db)

    async def _round(self) -> None:
        t0 = time.monotonic()
        await asyncio.to_thread(self._beat, *self.acked)
        snap = await asyncio.to_thread(read_snapshot, self.shared, self.directory.loaded,
                                       self.holds.loaded)
        self.holds.apply(snap)
        was_fresh = self.holds.fresh()
        self.holds.fresh_until = max(self.holds.fresh_until, t0 + self.lease)
        self._last_round = t0
        if not was_fresh or snap.entries is not None or snap.systems is not None \
                or snap.holds is not None:
            self.on_refresh()
        await self._acknowledge()

    async def _acknowledge(self) -> None:
        seen = self.holds.loaded
        idle = seen if self.holds.busy_held() == 0 else self.acked[1]
        if (seen, idle) != self.acked:
            await asyncio.to_thread(self._beat, seen, idle, True)
            self.acked = (seen, idle)

    def _beat(self, seen: int, idle: int, announce: bool = False) -> None:
        self.registry.heartbeat(self.name, seen, idle, self.dead_after, self.started_at,
                                self.info, self.control, announce)

    def wakeup(self) -> dict[str, Any]:
        """How this node learns of changes, for GET /v1/nodes: ``notify`` (LISTEN/NOTIFY
        with a safety poll) or ``poll``, and why when it is not ``notify``."""
        body: dict[str, Any] = {
            "mode": "notify" if self.listener is not None else "poll",
            "in_use": "notify" if self.notified() else "poll",
            "poll": self.poll, "safety_poll": self.safety_poll,
        }
        if self.listener is None:
            body["why"] = self.notify_off
        else:
            body.update(self.listener.status())
        return body

    # -- GET /v1/nodes ---------------------------------------------------------------
    async def nodes_view(self, request: web.Request) -> web.Response:
        """Every node: alive?, versions acknowledged, seconds since its heartbeat. While the
        shared database refuses (down, or taking no new connections), a 503 that says so,
        with what this node knows itself (how it learns of changes), instead of a bare 500."""
        try:
            now, states = await asyncio.to_thread(self.registry.states)
            version = await asyncio.to_thread(self._counters)
        except SQLAlchemyError as exc:
            # The driver's own first line: it names the server and the refusal, not the SQL
            # or its parameters.
            why = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
            return web.json_response({"error": f"shared database unreachable: {why}",
                                      "self": self.name, "wakeup": self.wakeup()}, status=503)
        body: dict[str, Any] = {"holds_version": version["holds_version"], "self": self.name,
                                "wakeup": self.wakeup(),
                                "nodes": [{
                                    "name": n.name, "alive": n.alive(now),
                                    "heartbeat_age": round(max(0.0, now - n.heartbeat_at), 3),
                                    "dead_after": n.dead_after, "holds_seen": n.holds_seen,
                                    "idle_for": n.idle_for, "info": n.info,
                                    "control": n.control,
                                } for n in states]}
        return web.json_response(body)
