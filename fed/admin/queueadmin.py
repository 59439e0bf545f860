"""The admin's view of the queue, and the postsuper-style operations on it.

What ``fed queue`` (``queuectl.py``) shows and does, through the control API:
list and show queued messages, flush (retry every pending recipient now), put one
message on hold or release it, delete it. An *admin hold* is per queue message and
distinct from the reconciler's per-address holds (``holds.py``): it stops delivery of
that message to every recipient until released, survives restarts (table
``admin_holds``), and the delivery scheduler must skip any recipient whose ``queue_id``
is in that table (``Spool.due`` does, in SQL). Like ``postsuper -h``, a hold does not
interrupt a delivery already in flight.

Deleting a message is destructive, so it is recorded: one ``deleted`` row per pending
recipient in the delivery log, before the rows and the spool file go.

Reads the queue tables of ``store.py`` directly (on the event loop thread); the destination
of a pending recipient is resolved as delivery would (physical address, else directory),
or is its domain for relayed mail.
"""

from __future__ import annotations

import time
from typing import Any

from mailferry.mail.addresses import domain_of, split_physical

from ..queue.spool import Spool
from ..routing.directory import Directory
from ..routing.holds import Holds
from ..telemetry.metrics import QueueState

HEADER_LIMIT = 64 * 1024


class QueueAdmin:
    """Queue inspection and admin operations over the fed store and spool."""

    def __init__(self, spool: Spool, directory: Directory, holds: Holds) -> None:
        self.spool = spool
        self.store = spool.store
        self.directory = directory
        self.holds = holds

    def destination(self, rcpt: str) -> str:
        """Where a recipient goes now: its system's name, or its domain if relayed."""
        split = split_physical(rcpt)
        if split is None:
            physical = self.directory.lookup(rcpt)
            split = split_physical(physical) if physical else None
        return split[0] if split else domain_of(rcpt)

    def admin_holds(self) -> dict[str, float]:
        """queue id -> time of the admin hold."""
        rows = self.store.query("SELECT queue_id, since FROM admin_holds")
        return {str(r["queue_id"]): float(r["since"]) for r in rows}

    def _recipients(self, queue_id: str) -> list[dict[str, Any]]:
        rows = self.store.query(
            "SELECT rcpt, status, attempts, next_try, last_error FROM recipients "
            "WHERE queue_id = ? ORDER BY rcpt", (queue_id,))
        return [{"rcpt": str(r["rcpt"]), "status": str(r["status"]),
                 "attempts": int(r["attempts"]), "next_try": float(r["next_try"]),
                 "last_error": r["last_error"], "held": self.holds.is_held(str(r["rcpt"])),
                 "destination": self.destination(str(r["rcpt"]))} for r in rows]

    def messages(self, limit: int) -> list[dict[str, Any]]:
        """Queued messages, oldest first, each with its recipients."""
        held = self.admin_holds()
        rows = self.store.query(
            "SELECT queue_id, mail_from, received_at, message_id, size FROM messages "
            "ORDER BY received_at, queue_id LIMIT ?", (limit,))
        return [self._message(dict(r), held) for r in rows]

    def _message(self, row: dict[str, Any], held: dict[str, float]) -> dict[str, Any]:
        queue_id = str(row["queue_id"])
        return {**row, "admin_hold": held.get(queue_id),
                "recipients": self._recipients(queue_id)}

    def message(self, queue_id: str) -> dict[str, Any] | None:
        """One queued message with its recipients and header section, or None."""
        rows = self.store.query(
            "SELECT queue_id, mail_from, received_at, message_id, size FROM messages "
            "WHERE queue_id = ?", (queue_id,))
        if not rows:
            return None
        return self._message(dict(rows[0]), self.admin_holds())

    def headers(self, queue_id: str) -> str:
        """The header section of a queued message (file work: call in a thread)."""
        try:
            with open(self.spool.path(queue_id), "rb") as f:
                head = f.read(HEADER_LIMIT)
        except OSError:
            return ""
        return head.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")

    def exists(self, queue_id: str) -> bool:
        """True if the message is in the queue."""
        return bool(self.store.query("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)))

    def hold(self, queue_id: str) -> bool:
        """Admin-hold a queued message (idempotent); False if not queued."""
        if not self.exists(queue_id):
            return False
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO admin_holds (queue_id, since) VALUES (?, ?)",
                       (queue_id, time.time()))
        return True

    def release(self, queue_id: str) -> bool:
        """Lift an admin hold; True if there was one. Its recipients are due at once."""
        with self.store.transaction() as db:
            gone = db.execute("DELETE FROM admin_holds WHERE queue_id = ?",
                              (queue_id,)).rowcount
            db.execute("UPDATE recipients SET next_try = 0 WHERE queue_id = ? "
                       "AND status = 'pending'", (queue_id,))
        return bool(gone)

    def flush(self) -> int:
        """Make every pending recipient due now; the number made due (held ones stay)."""
        with self.store.transaction() as db:
            return int(db.execute(
                "UPDATE recipients SET next_try = 0 WHERE status = 'pending' AND next_try > 0"
            ).rowcount)

    def delete(self, queue_id: str) -> int | None:
        """Remove a message from the queue, logged; pending recipients dropped, or None."""
        if not self.exists(queue_id):
            return None
        now = time.time()
        with self.store.transaction() as db:
            pending = [str(r[0]) for r in db.execute(
                "SELECT rcpt FROM recipients WHERE queue_id = ? AND status = 'pending'",
                (queue_id,))]
            message_id = db.execute("SELECT message_id FROM messages WHERE queue_id = ?",
                                    (queue_id,)).fetchone()[0]
            db.executemany(
                "INSERT INTO deliveries (at, queue_id, rcpt, physical, system, message_id, "
                "result, detail) VALUES (?, ?, ?, NULL, NULL, ?, 'deleted', "
                "'deleted by an admin (fed queue delete)')",
                [(now, queue_id, rcpt, message_id) for rcpt in pending])
            db.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
            db.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
            db.execute("DELETE FROM admin_holds WHERE queue_id = ?", (queue_id,))
        self.spool.path(queue_id).unlink(missing_ok=True)
        return len(pending)

    def state(self, connections: int = 0) -> QueueState:
        """The numbers the metrics gauges show."""
        state = QueueState(connections=connections)
        rows = self.store.query(
            "SELECT rcpt, COUNT(*) AS n FROM recipients WHERE status = 'pending' GROUP BY rcpt")
        for r in rows:
            dest = self.destination(str(r["rcpt"]))
            state.depth[dest] = state.depth.get(dest, 0) + int(r["n"])
            if self.holds.is_held(str(r["rcpt"])):
                state.held_recipients += int(r["n"])
        state.messages = int(self.store.query("SELECT COUNT(*) AS n FROM messages")[0]["n"])
        state.holds = len(self.holds.held)
        state.oldest_hold = min(self.holds.held.values(), default=None)
        admin = self.admin_holds()
        state.admin_held_messages = len(admin)
        state.oldest_admin_hold = min(admin.values(), default=None)
        state.quarantined = self.spool.count_quarantined()
        return state
