"""The durable spool: nothing is acknowledged before it is on disk (invariant 1).

Layout under ``<state dir>/spool``::

    tmp/     messages being written (never trusted; emptied at start)
    queue/   <queue id>.eml, one immutable file per accepted message
    shunt/   <queue id>-<n>.eml + .json: a copy of a message a system refused with 5xx,
             and why (a later issue turns these into bounces)

Accepting a message is Mailman's recipe: write the bytes to ``tmp/``, ``fsync`` the file,
``rename`` it into ``queue/``, ``fsync`` the directory (so the rename itself survives a
power cut), then commit the envelope and one row per recipient to SQLite (``synchronous=FULL``,
see ``store.py``). Only after that commit does the SMTP handler answer 250. A crash before
the commit leaves a queue file without rows: it was never acknowledged, so start-up removes
it. A crash after it loses nothing.

Per-recipient state (pending / done / shunted, attempts, next try) lives in SQLite because it
changes often and must change atomically. Delivery marks a recipient done only after the
system answered 250: a kill -9 between the two means that recipient is delivered again
(at-least-once), never that it is skipped. The message file is removed only after the
transaction that forgets the message has committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .store import Store

log = logging.getLogger("fed.spool")


@dataclass(frozen=True)
class PendingRecipient:
    """One recipient of one queued message that still needs delivering."""

    queue_id: str
    rcpt: str
    mail_from: str
    message_id: str | None
    attempts: int


def new_queue_id() -> str:
    """A sortable, unique queue id: microseconds since the epoch + randomness, in hex."""
    return f"{time.time_ns() // 1000:014X}{secrets.token_hex(3).upper()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(tmp_dir: Path, final: Path, data: bytes) -> None:
    """Write `data` to `final` so that it exists complete or not at all after any crash."""
    tmp = tmp_dir / (final.name + f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


class Spool:
    """Spool files plus the queue tables of the fed store."""

    def __init__(self, root: Path, store: Store) -> None:
        self.store = store
        self.tmp = root / "tmp"
        self.queue = root / "queue"
        self.shunt_dir = root / "shunt"
        for d in (self.tmp, self.queue, self.shunt_dir):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, queue_id: str) -> Path:
        """The queue file of a message."""
        return self.queue / f"{queue_id}.eml"

    def recover(self) -> int:
        """Clean up after a crash; return the number of messages still queued."""
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        known = {str(r["queue_id"]) for r in self.store.query("SELECT queue_id FROM messages")}
        for file in self.queue.glob("*.eml"):
            if file.stem not in known:
                # Never acknowledged (crash before the commit) or already fully delivered.
                log.info("removing unacknowledged or finished spool file %s", file.name)
                file.unlink(missing_ok=True)
        for queue_id in sorted(known):
            if not self.path(queue_id).exists():
                log.error("queue entry %s has no spool file; it cannot be delivered", queue_id)
        return len(known)

    async def accept(
        self, queue_id: str, mail_from: str, rcpts: list[str], data: bytes,
        message_id: str | None,
    ) -> None:
        """Make a message durable; return only when it is safe to answer 250."""
        await asyncio.to_thread(write_durably, self.tmp, self.path(queue_id), data)
        try:
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO messages (queue_id, mail_from, received_at, message_id, size) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (queue_id, mail_from, time.time(), message_id, len(data)),
                )
                db.executemany(
                    "INSERT OR IGNORE INTO recipients (queue_id, rcpt, status) "
                    "VALUES (?, ?, 'pending')",
                    [(queue_id, rcpt) for rcpt in rcpts],
                )
        except BaseException:
            self.path(queue_id).unlink(missing_ok=True)
            raise

    def read(self, queue_id: str) -> bytes:
        """The spooled bytes of a message (call it in a thread)."""
        return self.path(queue_id).read_bytes()

    def due(self, now: float, limit: int) -> list[PendingRecipient]:
        """Pending recipients whose next try is due, oldest message first."""
        rows = self.store.query(
            "SELECT r.queue_id, r.rcpt, r.attempts, m.mail_from, m.message_id "
            "FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
            "WHERE r.status = 'pending' AND r.next_try <= ? "
            "AND r.rcpt NOT IN (SELECT address FROM holds) "
            "AND r.queue_id NOT IN (SELECT queue_id FROM admin_holds) "
            "ORDER BY r.queue_id, r.rcpt LIMIT ?",
            (now, limit),
        )
        return [
            PendingRecipient(
                str(r["queue_id"]), str(r["rcpt"]), str(r["mail_from"]),
                None if r["message_id"] is None else str(r["message_id"]), int(r["attempts"]),
            )
            for r in rows
        ]

    def next_due(self, after: float) -> float | None:
        """The earliest retry time later than `after`, or None."""
        rows = self.store.query(
            "SELECT MIN(next_try) AS t FROM recipients WHERE status = 'pending' "
            "AND next_try > ?", (after,)
        )
        value = rows[0]["t"] if rows else None
        return None if value is None else float(value)

    def mark_done(self, queue_id: str, rcpt: str) -> None:
        """Record a successful delivery and forget the message once every recipient is done."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE recipients SET status = 'done' WHERE queue_id = ? AND rcpt = ?",
                (queue_id, rcpt),
            )
            finished = self._forget_if_finished(db, queue_id)
        if finished:
            self.path(queue_id).unlink(missing_ok=True)

    def mark_retry(self, queue_id: str, rcpt: str, attempts: int, next_try: float,
                   error: str) -> None:
        """Record a temporary failure and when to try again."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE recipients SET attempts = ?, next_try = ?, last_error = ? "
                "WHERE queue_id = ? AND rcpt = ?",
                (attempts, next_try, error, queue_id, rcpt),
            )

    def shunt(self, queue_id: str, rcpt: str, code: int, reason: str) -> Path:
        """Set a refused recipient's copy aside with the reason (file work: call in a thread)."""
        tag = hashlib.sha256(rcpt.encode()).hexdigest()[:10]
        eml = self.shunt_dir / f"{queue_id}-{tag}.eml"
        write_durably(self.tmp, eml, self.read(queue_id))
        info = {"queue_id": queue_id, "rcpt": rcpt, "code": code, "reason": reason,
                "at": time.time()}
        write_durably(self.tmp, eml.with_suffix(".json"), json.dumps(info).encode())
        return eml

    def mark_shunted(self, queue_id: str, rcpt: str, code: int, reason: str, path: Path) -> None:
        """Record that a recipient's copy is in the shunt folder."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE recipients SET status = 'shunted', last_error = ? "
                "WHERE queue_id = ? AND rcpt = ?",
                (reason, queue_id, rcpt),
            )
            db.execute(
                "INSERT OR REPLACE INTO shunted (queue_id, rcpt, at, code, reason, path) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (queue_id, rcpt, time.time(), code, reason, str(path)),
            )
            finished = self._forget_if_finished(db, queue_id)
        if finished:
            self.path(queue_id).unlink(missing_ok=True)

    @staticmethod
    def _forget_if_finished(db: sqlite3.Connection, queue_id: str) -> bool:
        """Delete the rows of a message with no pending recipient left; True if done."""
        left = db.execute(
            "SELECT COUNT(*) FROM recipients WHERE queue_id = ? AND status = 'pending'",
            (queue_id,),
        ).fetchone()[0]
        if left:
            return False
        db.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
        db.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
        return True

    def waiting(self, rcpt: str) -> int:
        """Number of messages pending for one recipient address."""
        rows = self.store.query(
            "SELECT COUNT(*) AS n FROM recipients WHERE rcpt = ? AND status = 'pending'", (rcpt,)
        )
        return int(rows[0]["n"])

    def shunted(self) -> list[dict[str, object]]:
        """Every shunted recipient copy, newest first."""
        rows = self.store.query("SELECT * FROM shunted ORDER BY at DESC")
        return [dict(r) for r in rows]
