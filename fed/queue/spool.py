"""The durable spool: nothing is acknowledged before it is on disk (invariant 1).

Layout under ``<state dir>/spool``::

    tmp/     shunt copies being written (never trusted; emptied at start)
    queue/   <queue id>.eml, one immutable file per accepted message: the message, its
             envelope and a checksummed footer (``queuefile.py``)
    shunt/   <queue id>-<tag>.eml + .json: a copy of a message a system refused with 5xx
             (or that expired in the queue), and why; the sender also gets a bounce
    quarantine/  <queue id>.eml + .json: a queue file fed could not trust or read (like
             Mailman's ``bad`` queue): never deleted, never delivered until an admin
             requeues it (``fed queue quarantine`` / ``fed queue requeue``)

Accepting is a group commit (``groupcommit.py``): every message that reaches the end of DATA
while the previous batch is syncing joins the next batch. For a batch, a worker thread
writes each message *with its envelope* straight to ``queue/<id>.eml`` (``O_EXCL``), then
fsyncs every file and ``queue/`` itself, all concurrently from a pool of threads (they share
the file system's journal commits). Message and envelope are durable now, and every session
of the batch gets its 250. One sync round per batch, like Postfix's one fsync per message,
and shared.

Index rows (``messages``, one ``recipients`` row per recipient) are written late: a message
is kept in memory (``Unindexed``) and its rows are written with the buffered outcomes only
once it has waited INDEX_AFTER, is retried or shunted, or anyone else reads or writes the
tables (``Store.catch_up``: the queue listing, a hold's count, the queue admin). Most
messages are delivered first and never touch the index at all: no insert, no update, no
delete, where one message with its rows written at once cost three transactions and some
fifteen WAL pages (``bench/fed_ab.sh`` at one client: the rate x1.07, CPU x0.94 a message).
The files are the truth either way: a crash leaves a queued message's file without rows,
which start-up rebuilds from its envelope (below).

Crash analysis (kill -9 or power cut at any instant):

- file written but not yet synced: never acknowledged; its footer is missing or its
  checksum wrong, so start-up removes it. Nothing else is taken for that: a file that
  cannot be read (EMFILE, EIO, EACCES), whose envelope does not parse or names another
  queue id goes to ``quarantine/``, logged and counted (``fed_quarantined``);
- file synced, rows not (yet) written or durable: start-up rebuilds the rows from the
  envelope in the file and delivers it (after done.log, below, marked what was delivered);
- rows without a file: the message was finished (files are unlinked before their rows are
  deleted) or never acknowledged; start-up drops the rows.

So every acknowledged message is delivered after a restart, at least once.

Delivery outcomes (done, retry, shunted, the ``deliveries`` log, forgetting a finished
message) are not worth an fsync each either: losing one only means delivering that
recipient again (at-least-once, as before). They are buffered and written a few
milliseconds later in one transaction with ``synchronous=NORMAL``. A kill -9 loses that
buffer, and with it the ``done`` marks of the deliveries of the last milliseconds (most of
the duplicates of a kill -9 storm): so each ``done`` is also appended at once to
``spool/done.log`` (one ``write``, no fsync: it survives a kill -9, which keeps the page
cache), which start-up applies before loading the queue and which a flush empties once
its transaction committed, unless a message without rows has done marks whose file is
still in the queue folder (done.log is then their only record; past DONE_LOG_MAX their
rows are written so that it can be emptied); the file of a finished
message leaves the queue folder first, and its rows are deleted only once it has (renamed
into recycle/ on the loop, the deletes in the same flush; or unlinked in a worker thread,
the deletes in a later flush), so a crash leaves
rows without a file (dropped at start) and never a finished message's file without rows or
done.log lines (start-up would rebuild and deliver it again). The unlink is not synced:
after a power cut it may come back, but then so may the ``done`` marks, which are not
synced either; the cost is a redelivery, never a message (``tests/test_fed_powerloss.py``).
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mailferry.fsutil import fsync_path, write_all

from ..telemetry import metrics
from .blanks import BLANK_SIZE, Blanks
from .groupcommit import GroupCommitter
from .queuefile import (
    EMPTY,
    BadQueueFile,
    Envelope,
    crc_of,
    new_queue_id,
    pwrite_all,
    read_envelope,
    read_message,
    read_queue_file,
    remove_file,
    trailer,
    try_fdatasync,
    try_fsync,
)
from .store import Store

log = logging.getLogger("fed.spool")

FLUSH_DELAY = 0.005  # seconds outcomes wait to share one transaction
INDEX_AFTER = 1.0  # seconds a message's index rows wait: most are delivered sooner (never
#                    written then)
DONE_LOG_MAX = 1 << 20  # bytes of done.log after which the marks it alone holds are written
CACHE_ONE = 256 * 1024  # messages up to this size stay in memory until delivered ...
CACHE_ALL = 64 * 1024 * 1024  # ... as long as all of them together stay below this


@dataclass
class PendingRecipient:
    """One recipient of one queued message that still needs delivering."""

    queue_id: str
    rcpt: str
    mail_from: str
    message_id: str | None
    attempts: int = 0
    next_try: float = 0.0
    received_at: float = 0.0
    size: int = 0
    last_error: str = ""


@dataclass
class Unindexed:
    """A durable message whose index rows are not written yet (``Spool`` "Index rows")."""

    envelope: Envelope
    done: set[str] = field(default_factory=set)  # recipients delivered meanwhile


@dataclass(frozen=True)
class Incoming:
    """A message on its way into the spool."""

    envelope: Envelope
    parts: tuple[bytes, ...]  # the message is their concatenation (never built in memory)
    blank: int = -1  # the open file of the blank it goes into (blanks.py), or -1: a new file
    quiet: bool = False  # few sessions are open: the loop may sync it itself


def _write_parts(fd: int, parts: list[bytes]) -> None:
    """All `parts`, in order, with one writev (each syscall of the writing thread is a GIL
    hand-off with the event loop under load); the rest of a short write one by one."""
    written = os.writev(fd, parts)
    for part in parts:
        if written >= len(part):
            written -= len(part)
            continue
        write_all(fd, part[written:] if written else part)
        written = 0


def _pwrite_parts(fd: int, parts: list[bytes]) -> None:
    """All `parts`, in order, from offset 0 (into a blank), with one pwritev."""
    written = os.pwritev(fd, parts, 0)
    offset = 0
    for part in parts:
        if written >= len(part):
            written -= len(part)
            offset += len(part)
            continue
        pwrite_all(fd, memoryview(part)[written:], offset + written)
        offset += len(part)
        written = 0


class BlankRemoved(FileNotFoundError):
    """A blank's file was removed before its message was synced (its folder replaced)."""


def _try_fdatasync(fd: int) -> OSError | None:
    """A blank's sync: its name, size and blocks were durable already (blanks.py). A
    blank someone removed meanwhile (its folder replaced, say) fails: no name, no 250."""
    failed = try_fdatasync(fd)
    if failed is None:
        try:
            if os.fstat(fd).st_nlink == 0:
                return BlankRemoved(f"blank queue file (fd {fd}) removed before its sync")
        except OSError as exc:
            return exc
    return failed


class QuarantineError(Exception):
    """A quarantined message cannot be requeued (the message says why)."""


def write_durably(tmp_dir: Path, final: Path, data: bytes) -> None:
    """Write `data` to `final` so that it exists complete or not at all after any crash."""
    tmp = tmp_dir / (final.name + f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_path(final.parent)


class Spool:
    """Spool files plus the queue tables of the fed store."""

    def __init__(self, root: Path, store: Store) -> None:
        self.store = store
        self.tmp = root / "tmp"
        self.queue = root / "queue"
        self.shunt_dir = root / "shunt"
        self.quarantine_dir = root / "quarantine"
        self.recycle = root / "recycle"  # finished files on their way to be blanks again
        for d in (self.tmp, self.queue, self.shunt_dir, self.quarantine_dir, self.recycle):
            d.mkdir(parents=True, exist_ok=True)
        self.on_queued: Callable[[list[PendingRecipient]], None] = lambda items: None
        self._committer: GroupCommitter[Incoming] = GroupCommitter(
            self._write_batch, self._commit_batch, self._undo, inline=self._fits_blank)
        self._ops: list[tuple[str, tuple[object, ...]]] = []
        self._unlink: list[str] = []  # queue ids of finished messages: file, then rows
        self._unlinking: set[asyncio.Future[None]] = set()  # unlinks in the thread pool
        self._flush_handle: asyncio.TimerHandle | None = None
        self._fsyncs = ThreadPoolExecutor(32, thread_name_prefix="fsync")
        self._blanks = Blanks(self.queue, self.recycle, self._fsyncs)
        self._taken: dict[str, int] = {}  # queue id -> open blank, until accept() takes it
        self.done_log = root / "done.log"
        self._done_fd = -1  # done.log, opened by start() (after recover() applied it)
        self._done_logged = False
        self._cache: dict[str, bytes] = {}  # queue id -> bytes of fresh small messages
        self._cached = 0
        self._unindexed: dict[str, Unindexed] = {}  # by queue id, oldest first
        self._done_unindexed: set[str] = set()  # those with done marks only done.log has
        self._done_bytes = 0  # appended to done.log since it was last emptied
        self._index_handle: asyncio.TimerHandle | None = None
        self.unindexed_written = 0  # statistics: index rows written late, and never
        self.unindexed_skipped = 0
        store.catch_up = self.write_outcomes

    def path(self, queue_id: str) -> Path:
        """The queue file of a message."""
        return self.queue / f"{queue_id}.eml"

    # -- start and stop ---------------------------------------------------------------
    def recover(self) -> int:
        """Clean up after a crash and rebuild lost index rows; return the messages queued."""
        for leftover in [*self.tmp.iterdir(), *self.recycle.iterdir()]:
            leftover.unlink(missing_ok=True)  # recycle/: finished messages only (blanks.py)
        for info in self.quarantine_dir.glob("*.json"):  # a quarantine cut short
            if not info.with_suffix(".eml").exists():
                info.unlink(missing_ok=True)
        known = {str(r["queue_id"]) for r in self.store.query("SELECT queue_id FROM messages")}
        rebuilt: list[Envelope] = []
        blanks = 0
        for file in sorted(self.queue.glob("*.eml")):
            if file.stem in known:
                continue
            try:
                envelope = read_envelope(file)
            except BadQueueFile as exc:
                if exc.reason == EMPTY:  # a blank never used (or never written): nothing
                    blanks += 1
                    file.unlink(missing_ok=True)
                elif exc.torn:  # what a crash before the fsync leaves: never acknowledged
                    log.info("removing incomplete (never acknowledged) spool file %s: %s",
                             file.name, exc.reason)
                    file.unlink(missing_ok=True)
                else:
                    self._quarantine_at_start(file, exc.reason)
                continue
            except OSError as exc:  # proves nothing about the file: keep it
                self._quarantine_at_start(file, f"cannot read: {exc}")
                continue
            if envelope.queue_id != file.stem:
                self._quarantine_at_start(
                    file, f"its envelope names queue id {envelope.queue_id}")
                continue
            rebuilt.append(envelope)
        if blanks:
            log.info("removed %d empty queue files (blanks a stop or crash left)", blanks)
        if rebuilt:
            # Index rows are written late (most never: see "Index rows"), so after a crash
            # the files of the messages that were queued then have none.
            log.info("indexed %d queued messages from their files (a crash came before "
                     "their rows were written): %s", len(rebuilt),
                     ", ".join(e.queue_id for e in rebuilt))
            with self.store.transaction() as db:
                self._index(db, rebuilt)
        self._apply_done_log()  # after the rebuild: a rebuilt message may have done ones
        finished = [str(r["queue_id"]) for r in self.store.query(
            "SELECT queue_id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r "
            "WHERE r.queue_id = m.queue_id AND r.status = 'pending')")]
        if finished:  # every recipient done, the crash came before the file went
            log.info("removing %d finished messages a crash left behind", len(finished))
            for queue_id in finished:
                remove_file(self.path(queue_id))
        known |= {e.queue_id for e in rebuilt}
        gone = [queue_id for queue_id in sorted(known) if not self.path(queue_id).exists()]
        if gone:
            # Finished (the file goes before its rows), quarantined or never acknowledged.
            log.info("dropping %d queue entries without a spool file", len(gone))
            with self.store.transaction() as db:
                db.executemany("DELETE FROM recipients WHERE queue_id = ?",
                               [(q,) for q in gone])
                db.executemany("DELETE FROM messages WHERE queue_id = ?", [(q,) for q in gone])
        return len(known) - len(gone)

    def _apply_done_log(self) -> None:
        """Mark done what done.log says was delivered (its rows' transaction may not have
        been written before the crash), then empty it."""
        try:
            raw = self.done_log.read_bytes()
        except FileNotFoundError:
            return
        done: list[tuple[str, str]] = []
        for line in raw.splitlines():
            try:
                queue_id, rcpt = json.loads(line)
            except (ValueError, TypeError):
                continue  # cannot happen with whole writes; a bad line costs a redelivery
            done.append((str(rcpt), str(queue_id)))
        if done:
            with self.store.transaction() as db:
                db.executemany("UPDATE recipients SET status = 'done' WHERE rcpt = ? AND "
                               "queue_id = ? AND status = 'pending'", done)
            log.info("applied %d delivery outcomes from %s", len(done), self.done_log.name)
        self.done_log.unlink()

    def _quarantine_at_start(self, file: Path, reason: str) -> None:
        try:
            self._move_to_quarantine(file, reason, None, "start-up")
        except OSError as exc:  # left where it is: the next start tries again
            log.error("cannot quarantine %s (%s): %s; left in the queue folder", file.name,
                      reason, exc)

    # -- quarantine -----------------------------------------------------------------------
    def _move_to_quarantine(self, file: Path, reason: str, rcpts: list[str] | None,
                            where: str) -> Path:
        """Set a queue file aside with why (file work); `rcpts`: the recipients still
        pending (None: every recipient of its envelope). Raises OSError."""
        queue_id = file.stem
        info = {"queue_id": queue_id, "reason": reason, "at": time.time(), "where": where,
                "rcpts": rcpts}
        target = self.quarantine_dir / file.name
        # The reason first: a crash in between leaves a .json without .eml (removed at
        # start) and the file still in the queue, where the next start finds it again.
        write_durably(self.tmp, target.with_suffix(".json"), json.dumps(info).encode())
        os.rename(file, target)
        fsync_path(self.quarantine_dir)
        fsync_path(self.queue)
        log.error("%s quarantined (%s): %s; see fed queue quarantine", queue_id, where,
                  reason, extra={"queue_id": queue_id})
        metrics.count_quarantined(where)
        return target

    async def quarantine(self, queue_id: str, reason: str) -> list[str]:
        """Take a queued message out of delivery into quarantine (a file that failed its
        checksum); its pending recipients, which are logged as ``quarantined``."""
        self.write_outcomes()
        pending = [str(r["rcpt"]) for r in self.store.query(
            "SELECT rcpt FROM recipients WHERE queue_id = ? AND status = 'pending' "
            "ORDER BY rcpt", (queue_id,))]
        message_id = next((r["message_id"] for r in self.store.query(
            "SELECT message_id FROM messages WHERE queue_id = ?", (queue_id,))), None)
        await asyncio.to_thread(self._move_to_quarantine, self.path(queue_id), reason,
                                pending, "delivery")
        self.uncache(queue_id)
        now = time.time()
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO deliveries (at, queue_id, rcpt, physical, system, message_id, "
                "result, detail) VALUES (?, ?, ?, NULL, NULL, ?, 'quarantined', ?)",
                [(now, queue_id, rcpt, message_id, reason) for rcpt in pending])
            db.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
            db.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
        return pending

    def quarantined(self) -> list[dict[str, object]]:
        """Every quarantined message with the reason, oldest first."""
        found: list[dict[str, object]] = []
        for file in sorted(self.quarantine_dir.glob("*.eml")):
            info: dict[str, object] = {"queue_id": file.stem, "reason": "unknown",
                                       "at": None, "where": None, "rcpts": None}
            try:
                info.update(json.loads(file.with_suffix(".json").read_bytes()))
                info["size"] = file.stat().st_size
            except (OSError, ValueError) as exc:
                info["reason"] = f"{info['reason']} (info unreadable: {exc})"
            info["path"] = str(file)
            found.append(info)
        found.sort(key=lambda i: (i["at"] if isinstance(i["at"], int | float) else 0.0,
                                  str(i["queue_id"])))
        return found

    def count_quarantined(self) -> int:
        """Messages in quarantine (for the metrics gauge)."""
        return sum(1 for _ in self.quarantine_dir.glob("*.eml"))

    async def requeue(self, queue_id: str) -> int:
        """Put a quarantined message back into the queue if its file checks out now (its
        checksum, its envelope); the number of recipients queued. QuarantineError if not."""
        file = self.quarantine_dir / f"{queue_id}.eml"
        if not file.exists():
            raise QuarantineError(f"{queue_id} is not in quarantine")
        if queue_id in {str(r["queue_id"]) for r in self.store.query(
                "SELECT queue_id FROM messages WHERE queue_id = ?", (queue_id,))}:
            raise QuarantineError(f"{queue_id} is already queued")

        def check_and_move() -> Envelope:
            try:
                envelope, _ = read_queue_file(file)
            except (BadQueueFile, OSError) as exc:
                raise QuarantineError(f"{queue_id} still fails its check: {exc}") from exc
            if envelope.queue_id != queue_id:
                raise QuarantineError(f"{queue_id}: its envelope names queue id "
                                      f"{envelope.queue_id}")
            try:
                info = json.loads(file.with_suffix(".json").read_bytes())
            except (OSError, ValueError):
                info = {}
            rcpts = info.get("rcpts")
            if isinstance(rcpts, list) and rcpts:
                envelope = Envelope(envelope.queue_id, envelope.mail_from,
                                    tuple(str(r) for r in rcpts), envelope.message_id,
                                    envelope.received_at, envelope.size)
            target = self.path(queue_id)
            if target.exists():
                raise QuarantineError(f"{queue_id} is already in the queue folder")
            os.rename(file, target)
            fsync_path(self.queue)
            fsync_path(self.quarantine_dir)
            return envelope

        envelope = await asyncio.to_thread(check_and_move)
        with self.store.transaction() as db:  # synced: the rows say which recipients
            self._index(db, [envelope])
        (self.quarantine_dir / f"{queue_id}.json").unlink(missing_ok=True)
        log.warning("%s requeued from quarantine for %s", queue_id, ", ".join(envelope.rcpts),
                    extra={"queue_id": queue_id})
        self.on_queued([PendingRecipient(queue_id, rcpt, envelope.mail_from,
                                         envelope.message_id, received_at=envelope.received_at,
                                         size=envelope.size) for rcpt in envelope.rcpts])
        return len(envelope.rcpts)

    @staticmethod
    def _index(db: sqlite3.Connection, envelopes: Sequence[Envelope]) -> None:
        db.executemany(
            "INSERT INTO messages (queue_id, mail_from, received_at, message_id, size) "
            "VALUES (?, ?, ?, ?, ?)",
            [(e.queue_id, e.mail_from, e.received_at, e.message_id, e.size) for e in envelopes],
        )
        db.executemany(
            "INSERT OR IGNORE INTO recipients (queue_id, rcpt, status) VALUES (?, ?, 'pending')",
            [(e.queue_id, rcpt) for e in envelopes for rcpt in dict.fromkeys(e.rcpts)],
        )

    def start(self) -> None:
        """Start the group committer (on the running loop) and the first blanks."""
        self._done_fd = os.open(self.done_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._committer.start()
        self._blanks.refill()

    async def close(self) -> None:
        """Answer the accepts in progress and write the buffered outcomes."""
        await self._committer.close()
        await self.flush()
        while self._unlinking:  # their row deletes come after them (write_outcomes)
            await asyncio.wait(set(self._unlinking))
            await self.flush()
        self._fsyncs.shutdown()  # no blank is being made after this
        self._blanks.close()
        for queue_id, fd in self._taken.items():  # taken, never accepted
            os.close(fd)
            self.path(queue_id).unlink(missing_ok=True)
        self._taken.clear()
        if self._done_fd >= 0:
            os.close(self._done_fd)
            self._done_fd = -1

    def stats(self) -> str:
        """Group commit statistics, for the log at shutdown."""
        c = self._committer
        n = max(1, c.batches)
        ones = max(1, c.single_batches)
        b = self._blanks
        return (f"{c.items} messages in {c.batches} batches ({c.inline} written on the loop; "
                f"{b.taken} into blanks, {b.missed} new files; {b.reused} blanks were "
                f"finished messages' files); per batch: write+fsync "
                f"{1000 * c.write_seconds / n:.2f} ms, index {1000 * c.commit_seconds / n:.2f} "
                f"ms, whole cycle {1000 * c.cycle_seconds / n:.2f} ms; the {c.single_batches} "
                f"batches of one message: write+fsync {1000 * c.single_write_seconds / ones:.2f}"
                f" ms, whole cycle {1000 * c.single_cycle_seconds / ones:.2f} ms; index rows "
                f"of {self.unindexed_written} written late, of {self.unindexed_skipped} never "
                f"(finished first)")

    # -- accepting ----------------------------------------------------------------------
    def take_queue_id(self) -> str:
        """The queue id for a message about to be accepted: a blank's (its file is ready,
        ``blanks.py``) or, when none is ready, a new one. Call `accept` with it next."""
        blank = self._blanks.take()
        if blank is None:
            return new_queue_id()
        self._taken[blank[0]] = blank[1]
        return blank[0]

    async def accept(
        self, queue_id: str, mail_from: str, rcpts: list[str], data: bytes | Sequence[bytes],
        message_id: str | None, quiet: bool = False,
    ) -> None:
        """Make a message durable (`data`: its bytes, or pieces of it in order); return only
        when it is safe to answer 250. `quiet`: few sessions are open (the SMTP server's
        INLINE_SESSIONS), so a message that fits its blank may be synced on the loop
        itself (groupcommit.py)."""
        parts = (data,) if isinstance(data, bytes) else tuple(data)
        envelope = Envelope(queue_id, mail_from, tuple(dict.fromkeys(rcpts)), message_id,
                            time.time(), sum(len(part) for part in parts))
        await self._committer.submit(Incoming(envelope, parts, self._taken.pop(queue_id, -1),
                                              quiet))

    @staticmethod
    def _fits_blank(item: Incoming) -> bool:
        """True if few sessions are open and `item` goes into a blank without growing it:
        then its commit is one pwritev and one fdatasync, quick enough for the loop itself,
        and the few other sessions wait less for it than the hand-off to the writing thread
        would cost (with many, batches share one sync round)."""
        e = item.envelope
        return item.quiet and item.blank >= 0 and e.size + 512 + len(e.mail_from) + len(
            e.message_id or "") + sum(len(r) + 3 for r in e.rcpts) <= BLANK_SIZE

    def _write_batch(self, batch: Sequence[Incoming]) -> list[BaseException | None]:
        """Worker thread (or the loop, for one message that fits its blank): write every
        file (message + envelope), fsync them and, unless all were blanks, the folder."""
        errors: list[BaseException | None] = []
        fds: list[int] = []
        blank: set[int] = set()
        for item in batch:
            if item.blank >= 0:  # its name is durable: write over the zeros, fdatasync
                fds.append(item.blank)
                blank.add(item.blank)
                try:
                    _pwrite_parts(item.blank, [*item.parts,
                                               trailer(item.envelope, crc_of(item.parts))])
                    errors.append(None)
                except OSError as exc:
                    errors.append(exc)
                continue
            try:
                fd = os.open(self.path(item.envelope.queue_id),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                errors.append(exc)
                fds.append(-1)
                continue
            fds.append(fd)
            try:
                _write_parts(fd, [*item.parts, trailer(item.envelope, crc_of(item.parts))])
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        # All fsyncs at once: the folder's and every file's but the first from a pool of
        # threads, the first file's here, meanwhile (concurrent fsyncs wait for the same
        # journal commit, where one after the other each may force its own while other
        # files, finished messages being unlinked, keep changing; and the one syncing here
        # saves a batch of one message a hand-off to the pool and back).
        jobs = [fd for n, fd in enumerate(fds) if fd >= 0 and errors[n] is None]
        new = any(fd not in blank for fd in jobs)  # a new name: the folder needs its fsync
        dir_fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY) if new else -1
        try:
            if jobs:
                pooled = [self._fsyncs.submit(_try_fdatasync if fd in blank else try_fsync,
                                              fd) for fd in jobs[1:]]
                if new:
                    pooled.append(self._fsyncs.submit(try_fsync, dir_fd))
                first = (_try_fdatasync if jobs[0] in blank else try_fsync)(jobs[0])
                outcomes = [first, *(f.result() for f in pooled)]
            else:
                outcomes = []
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            if dir_fd >= 0:
                os.close(dir_fd)
        if new and outcomes[-1] is not None:  # the folder: no new name is durable
            return [outcomes[-1]] * len(errors)
        if any(isinstance(outcome, BlankRemoved) for outcome in outcomes):
            self._blanks.discard_ready()  # made in the same folder: gone too
        by_fd = dict(zip(jobs, outcomes, strict=False))
        return [err if err is not None else by_fd.get(fd) for err, fd in zip(errors, fds,
                                                                               strict=True)]

    async def _commit_batch(self, batch: Sequence[Incoming]) -> None:
        """The (already durable) batch is queued: its index rows wait (see "Index rows")."""
        for m in batch:
            self._unindexed[m.envelope.queue_id] = Unindexed(m.envelope)
            self._remember(m)
        if self._index_handle is None:
            self._index_handle = asyncio.get_running_loop().call_later(
                INDEX_AFTER, self._index_due)
        self.on_queued([
            PendingRecipient(e.queue_id, rcpt, e.mail_from, e.message_id,
                             received_at=e.received_at, size=e.size)
            for e in (m.envelope for m in batch) for rcpt in e.rcpts
        ])

    def _remember(self, message: Incoming) -> None:
        """Keep a small message's bytes for its delivery (saves reading the file back)."""
        if message.envelope.size > CACHE_ONE:
            return
        self._cache[message.envelope.queue_id] = b"".join(message.parts)
        self._cached += message.envelope.size
        while self._cached > CACHE_ALL and self._cache:
            self._cached -= len(self._cache.pop(next(iter(self._cache))))

    def _undo(self, item: Incoming) -> None:
        self.path(item.envelope.queue_id).unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------
    def read(self, queue_id: str) -> bytes:
        """The spooled bytes of a message (big ones: call it in a thread)."""
        cached = self._cache.get(queue_id)
        return cached if cached is not None else read_message(self.path(queue_id))

    def pending(self) -> list[PendingRecipient]:
        """Every pending recipient, oldest message first (by arrival; at start-up)."""
        rows = self.store.query(
            "SELECT r.queue_id, r.rcpt, r.attempts, r.next_try, r.last_error, m.mail_from, "
            "m.message_id, m.received_at, m.size "
            "FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
            "WHERE r.status = 'pending' ORDER BY m.received_at, r.queue_id, r.rcpt")
        return [
            PendingRecipient(
                str(r["queue_id"]), str(r["rcpt"]), str(r["mail_from"]),
                None if r["message_id"] is None else str(r["message_id"]), int(r["attempts"]),
                float(r["next_try"]), float(r["received_at"]), int(r["size"]),
                str(r["last_error"] or ""),
            )
            for r in rows
        ]

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

    # -- outcomes (buffered) ------------------------------------------------------------
    def mark_done(self, queue_id: str, rcpt: str) -> None:
        """Record a successful delivery (at once in done.log, in the store with the next
        flush)."""
        logged = False
        if self._done_fd >= 0:
            line = json.dumps([queue_id, rcpt]).encode() + b"\n"
            try:
                os.write(self._done_fd, line)
                self._done_logged = logged = True
                self._done_bytes += len(line)
            except OSError as exc:  # the store still gets it with the next flush
                log.warning("cannot append to %s: %s", self.done_log, exc)
        unindexed = self._unindexed.get(queue_id)
        if unindexed is not None and logged:  # its rows, when written, say done
            unindexed.done.add(rcpt)
            self._done_unindexed.add(queue_id)
            return
        self._write_index_later(queue_id)  # done.log refused the mark: the store must have it
        self._buffer("UPDATE recipients SET status = 'done' WHERE queue_id = ? AND rcpt = ?",
                     (queue_id, rcpt))

    def mark_retry(self, queue_id: str, rcpt: str, attempts: int, next_try: float,
                   error: str) -> None:
        """Record a temporary failure and when to try again."""
        self._write_index_later(queue_id)  # a retried message stays: its rows with it
        self._buffer("UPDATE recipients SET attempts = ?, next_try = ?, last_error = ? "
                     "WHERE queue_id = ? AND rcpt = ?",
                     (attempts, next_try, error, queue_id, rcpt))

    def mark_shunted(self, queue_id: str, rcpt: str, code: int, reason: str, path: Path) -> None:
        """Record that a recipient's copy is in the shunt folder."""
        self._write_index_later(queue_id)
        self._buffer("UPDATE recipients SET status = 'shunted', last_error = ? "
                     "WHERE queue_id = ? AND rcpt = ?", (reason, queue_id, rcpt))
        self._buffer("INSERT OR REPLACE INTO shunted (queue_id, rcpt, at, code, reason, path) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (queue_id, rcpt, time.time(), code, reason, str(path)))

    def log_delivery(self, queue_id: str, rcpt: str, physical: str | None,
                     system: str | None, message_id: str | None, result: str,
                     detail: str) -> None:
        """Append one row to the delivery log."""
        self._buffer("INSERT INTO deliveries (at, queue_id, rcpt, physical, system, "
                     "message_id, result, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (time.time(), queue_id, rcpt, physical, system, message_id, result,
                      detail))

    def uncache(self, queue_id: str) -> None:
        """Drop a message's bytes from memory."""
        cached = self._cache.pop(queue_id, None)
        if cached is not None:
            self._cached -= len(cached)

    def forget(self, queue_id: str) -> None:
        """Every recipient is finished: remove the file, then (once it is gone) the rows."""
        self.uncache(queue_id)
        self._unlink.append(queue_id)
        self._flush_later()

    def _unlinked(self, queue_ids: list[str]) -> None:
        """The files are gone: now their rows may go (appended to the buffer; the caller
        writes or schedules it); rows never written need nothing, and their done marks in
        done.log are of no use any more."""
        for queue_id in queue_ids:
            if self._unindexed.pop(queue_id, None) is not None:
                self._done_unindexed.discard(queue_id)
                self.unindexed_skipped += 1
                continue
            self._ops.append(("DELETE FROM recipients WHERE queue_id = ?", (queue_id,)))
            self._ops.append(("DELETE FROM messages WHERE queue_id = ?", (queue_id,)))

    def _write_index_later(self, queue_id: str) -> None:
        """Buffer the index rows of a message not indexed yet (a no-op for one that is): in
        the buffer's order, so that outcomes buffered after them apply to them."""
        unindexed = self._unindexed.pop(queue_id, None)
        if unindexed is None:
            return
        self._done_unindexed.discard(queue_id)
        self.unindexed_written += 1
        e = unindexed.envelope
        # Appended, not _buffer()ed: the callers buffer their own outcome (or write now).
        self._ops.append(("INSERT INTO messages (queue_id, mail_from, received_at, "
                          "message_id, size) VALUES (?, ?, ?, ?, ?)",
                          (e.queue_id, e.mail_from, e.received_at, e.message_id, e.size)))
        self._ops.extend(("INSERT OR IGNORE INTO recipients (queue_id, rcpt, status) VALUES "
                          "(?, ?, ?)", (e.queue_id, rcpt,
                                        "done" if rcpt in unindexed.done else "pending"))
                         for rcpt in dict.fromkeys(e.rcpts))

    def _index_due(self) -> None:
        """Timer: write the index rows of the messages queued INDEX_AFTER ago or more."""
        self._index_handle = None
        self.write_outcomes(index_all=False)

    def _buffer(self, sql: str, params: tuple[object, ...]) -> None:
        self._ops.append((sql, params))
        self._flush_later()

    def _flush_later(self) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(FLUSH_DELAY, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self.write_outcomes(index_all=False)

    async def flush(self) -> None:
        """Write the buffered outcomes and every index row held back (at shutdown)."""
        for handle in (self._flush_handle, self._index_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._index_handle = None
        self.write_outcomes()

    def write_outcomes(self, index_all: bool = True) -> None:
        """Write the buffered outcomes now, and every index row held back (the store calls
        this before anyone else reads or writes it). `index_all=False` (the spool's
        timers): only the rows of messages queued INDEX_AFTER ago or more, and those whose
        done marks keep done.log from being emptied once it has grown past DONE_LOG_MAX."""
        if self._unindexed:
            due = time.time() - INDEX_AFTER
            overdue = self._done_bytes > DONE_LOG_MAX
            now_due: list[str] = []
            for queue_id, unindexed in self._unindexed.items():
                if (index_all or unindexed.envelope.received_at <= due
                        or (overdue and queue_id in self._done_unindexed)):
                    now_due.append(queue_id)
                elif not overdue:
                    break  # oldest first (within a batch or two): the rest are younger
            for queue_id in now_due:
                self._write_index_later(queue_id)
            if self._unindexed and self._index_handle is None:
                oldest = next(iter(self._unindexed.values())).envelope.received_at
                self._index_handle = asyncio.get_running_loop().call_later(
                    max(FLUSH_DELAY, oldest + INDEX_AFTER - time.time()), self._index_due)
        if self._unlink:
            # Files first, rows after the files left the queue folder: a crash then leaves
            # rows without a file (dropped at start), never a finished message's file
            # without rows (it would be delivered again). Most become blanks again: renamed
            # into recycle/ here (blanks.py), their rows deleted in this very flush; the
            # rest are unlinked in a thread (an unlink can wait for the disk) and their
            # rows deleted by the flush after that finished.
            queue_ids, self._unlink = self._unlink, []
            left = self._blanks.reuse([self.path(q) for q in queue_ids])
            waiting = {file.stem for file in left}
            self._unlinked([q for q in queue_ids if q not in waiting])
            if left:
                future = asyncio.wrap_future(self._fsyncs.submit(Blanks.remove, left))
                self._unlinking.add(future)

                def unlinked(done: asyncio.Future[None]) -> None:
                    self._unlinking.discard(done)
                    self._unlinked(sorted(waiting))
                    self._flush_later()

                future.add_done_callback(unlinked)
        ops, self._ops = self._ops, []
        if ops:
            # No fsync per outcome: losing one costs a redelivery, never a message.
            with self.store.transaction(durable=False, catch_up=False) as db:
                start = 0
                while start < len(ops):  # consecutive equal statements: one executemany
                    end = start + 1
                    while end < len(ops) and ops[end][0] == ops[start][0]:
                        end += 1
                    db.executemany(ops[start][0], [p for _, p in ops[start:end]])
                    start = end
        # Every line in done.log is in the store now, or of a message whose file has left
        # the queue folder, unless a message not indexed yet has done marks.
        if self._done_logged and not self._done_unindexed:
            os.ftruncate(self._done_fd, 0)
            self._done_logged = False
            self._done_bytes = 0

    # -- shunt ----------------------------------------------------------------------------
    def shunt(self, queue_id: str, rcpt: str, code: int, reason: str) -> Path:
        """Set a refused recipient's copy aside with the reason (file work: call in a thread)."""
        tag = hashlib.sha256(rcpt.encode()).hexdigest()[:10]
        eml = self.shunt_dir / f"{queue_id}-{tag}.eml"
        write_durably(self.tmp, eml, self.read(queue_id))
        info = {"queue_id": queue_id, "rcpt": rcpt, "code": code, "reason": reason,
                "at": time.time()}
        write_durably(self.tmp, eml.with_suffix(".json"), json.dumps(info).encode())
        return eml
