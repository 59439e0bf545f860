"""The `nodes` table: who is alive, which holds version each node has loaded and honours.

A hold is only worth something if every node that could still deliver for the held
addresses has stopped. Each node therefore keeps one row here (written by its
``node_agent.py``): a heartbeat in the *database's* clock, the holds version it has loaded
(``holds_seen``), the newest holds version for which it also has no delivery of a held
address in flight (``idle_for``), and how long after its last heartbeat it is surely
harmless (``dead_after`` = its lease + its delivery timeout + 1 s: a node stops starting
deliveries one lease after its last successful heartbeat round, and a delivery it started
just before ends within the delivery timeout).

``blocking`` is the whole decision the hold call waits on, kept pure so it can be read and
tested alone. The protocol and its failure cases are in docs/fed-multinode.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, update

from . import shared_db as t
from .shared_db import SharedDB


@dataclass(frozen=True)
class NodeState:
    """One row of the nodes table."""

    name: str
    heartbeat_at: float
    dead_after: float
    holds_seen: int
    idle_for: int
    started_at: float
    info: str
    control: str | None = None  # HOST:PORT of its control API (None: not known yet)

    def alive(self, now: float) -> bool:
        """Might this node still deliver? (database clock)"""
        return now - self.heartbeat_at <= self.dead_after


def blocking(nodes: list[NodeState], version: int, now: float) -> list[str]:
    """Nodes that may still deliver for a hold written at holds `version`: alive, and not
    yet idle for that version."""
    return sorted(n.name for n in nodes if n.idle_for < version and n.alive(now))


class NodeRegistry:
    """Reads and writes of the nodes table (blocking calls: run them in a thread)."""

    def __init__(self, shared: SharedDB) -> None:
        self.shared = shared

    def heartbeat(self, name: str, holds_seen: int, idle_for: int, dead_after: float,
                  started_at: float, info: str, control: str | None = None,
                  announce: bool = False) -> None:
        """Upsert this node's row with the database's current time; with `announce`, tell
        the listening nodes (an acknowledgement a hold call may be waiting for)."""
        values = {"heartbeat_at": self.shared.now(), "holds_seen": holds_seen,
                  "idle_for": idle_for, "dead_after": dead_after, "started_at": started_at,
                  "info": info[:1000], "control": control}
        # Only this node writes its row, so update-then-insert does not race.
        with self.shared.engine.begin() as db:
            if db.execute(update(t.nodes).where(t.nodes.c.name == name)
                          .values(values)).rowcount == 0:
                db.execute(insert(t.nodes).values(name=name, **values))
            if announce:
                t.announce(db, "nodes")

    def set_control(self, name: str, control: str) -> None:
        """Record where this node's control API listens (once it is bound)."""
        with self.shared.engine.begin() as db:
            db.execute(update(t.nodes).where(t.nodes.c.name == name).values(control=control))

    def leave(self, name: str) -> None:
        """Mark this node gone (clean shutdown, nothing in flight): holds stop waiting."""
        with self.shared.engine.begin() as db:
            db.execute(update(t.nodes).where(t.nodes.c.name == name).values(heartbeat_at=0.0))
            t.announce(db, "nodes")

    def states(self) -> tuple[float, list[NodeState]]:
        """(database time now, every node row): the time is read first, so a heartbeat
        committed in between only makes its node look more alive."""
        with self.shared.read() as db:
            now = float(db.scalar(select(self.shared.now())) or 0.0)
            rows = db.execute(select(t.nodes).order_by(t.nodes.c.name)).all()
        return now, [NodeState(str(r.name), float(r.heartbeat_at), float(r.dead_after),
                               int(r.holds_seen), int(r.idle_for), float(r.started_at),
                               str(r.info), r.control) for r in rows]

    def blocking(self, version: int) -> list[str]:
        """Nodes a hold written at `version` still waits for."""
        now, states = self.states()
        return blocking(states, version, now)
