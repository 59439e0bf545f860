"""Queue files made ahead: named, sized and durable before a message needs one.

Why: making a new file durable takes the file's fsync *and* its folder's (the name), and
both are journal commits on ext4, the fsync of a lone message's critical path. A blank is
``queue/<queue id>.eml`` created ahead of time, filled with BLANK_SIZE zero bytes (real
blocks, not a hole or an unwritten extent), fsynced, and its folder fsynced after it; all
in a background thread, off the critical path. A message that fits is then written over
the zeros from offset 0 and made durable by one ``fdatasync``: its name was durable
already, its size and blocks do not change, so the sync is the data and a cache flush, no
journal commit (``bench/fsync_modes.py``'s ``blank``). A message that does not fit
extends the file; the fdatasync then also commits the new size, still without a folder
fsync.

What a blank looks like after a crash, and what start-up does (``Spool.recover``): a
queue file is its content (message, envelope, footer: ``queuefile.py``) followed by zero
bytes up to the blank's size; ``queuefile`` finds the content's end as the last non-zero
byte (the footer ends with a newline, so content never ends with a zero). A blank never
written is all zeros: no footer, never acknowledged, removed. A blank written but not
synced (a power cut before the fdatasync returned) holds zeros, a part of the message, or
all of it with stale pages: no valid footer or a checksum that does not match, so never
acknowledged, removed; or all of it intact, rebuilt and delivered like any complete file
whose index rows were lost (at least once). An acknowledged message's fdatasync returned
before its 250, so its bytes are on disk under a name that was on disk before it.

Finished messages' files become blanks again (``Blanks.reuse``) instead of being unlinked:
a file from a blank's size up to REUSE_MAX (a message may have grown it) leaves ``queue/``
by a rename into ``recycle/`` (that is the moment its message is gone: its rows may go
after); once REUSE_BATCH of them wait there (or the ready blanks run low) they are zeroed
and fdatasynced there, and only then renamed into ``queue/`` under new queue ids, their
folder fsynced once for all, and handed out. Why: an unlink frees the inode and the blocks
(on a file system mounted with ``discard`` also a discard request to the disk) and the next
blank allocates them again; a reused file keeps both, which on this machine took 5 % of
fed's CPU a message for the unlink half alone (``bench/fed_ab.sh``). After a crash
``recycle/`` holds only finished messages (their own or zeros): start-up empties it; a name
in ``queue/`` that came from it was zeros on disk before it was named there.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

from mailferry.fsutil import fsync_path, write_all

from .queuefile import (
    new_queue_id,
    pwrite_all,
    remove_file,
    try_fdatasync,
    try_fsync,
)

log = logging.getLogger("fed.blanks")

BLANK_SIZE = 8192  # bytes of zeros per blank: a message up to this (with envelope) fits
KEEP = 128  # blanks kept ready; a refill starts when a quarter of them are used
REUSE_BATCH = 32  # finished files zeroed, renamed and their folder synced together
# A finished file up to this size becomes a blank again, whatever message grew it (mail is
# mostly 10-100 KB; a blank bigger than BLANK_SIZE just takes a bigger message without
# growing): bounds the disk the ready blanks hold to 2 * KEEP * REUSE_MAX (16 MiB).
REUSE_MAX = 1 << 16
_ZEROS = bytes(BLANK_SIZE)
_REUSE_ZEROS = memoryview(bytes(REUSE_MAX))


def _still_named(blanks: list[tuple[str, int]]) -> None:
    """Raise if a blank just made lost its name while it was synced (its folder removed or
    replaced under fed): handed out, it would fail its message's sync with a 451."""
    for queue_id, fd in blanks:
        if os.fstat(fd).st_nlink == 0:
            raise FileNotFoundError(f"blank {queue_id} removed while it was made")


def is_blank(path: Path) -> bool:
    """True for a file that holds nothing but zero bytes (an unused blank)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return False
    return True


class Blanks:
    """A supply of blanks in one folder; `take` on the loop, `refill` in a thread."""

    def __init__(self, folder: Path, recycle: Path, pool: Executor, keep: int = KEEP
                 ) -> None:
        self.folder = folder
        self.recycle = recycle  # finished files are zeroed here, then named blanks again
        self._pool = pool
        self._syncs = ThreadPoolExecutor(8, thread_name_prefix="blank-fsync")
        self._keep = keep
        self._ready: collections.deque[tuple[str, int]] = collections.deque()  # (qid, fd)
        self._refilling = False
        self._closed = False
        self.made = 0  # statistics
        self.taken = 0
        self.missed = 0  # takes that found none ready
        self.reused = 0  # blanks made of finished messages' files
        self._recycled: list[tuple[str, int, int]] = []  # in recycle/ (name, fd, size): loop
        self.naming = 0  # batches of recycled files being zeroed and named blanks
        self._naming_lock = threading.Lock()  # `naming` changes on the loop and in the pool

    def take(self) -> tuple[str, int] | None:
        """A ready blank's queue id and its open file (O_RDWR), or None if none is ready
        (the caller then makes a new file, with its folder's fsync)."""
        if len(self._ready) < self._keep * 3 // 4:
            self.refill()
        try:
            blank = self._ready.popleft()
        except IndexError:
            self.missed += 1
            return None
        self.taken += 1
        return blank

    def refill(self) -> None:
        """Make blanks up to `keep` in a worker thread, unless that is already under way
        (the spool calls this at start, so the first messages find some ready)."""
        if self._refilling or self._closed:
            return
        self._refilling = True
        future = self._pool.submit(self._make, self._keep - len(self._ready))
        future.add_done_callback(self._made)

    def _made(self, future: object) -> None:
        self._refilling = False

    def _make(self, count: int) -> None:
        """Worker thread: `count` blanks, each fsynced, then their folder; only then are
        they handed out (a blank's name must be durable before a message trusts it)."""
        made: list[tuple[str, int]] = []
        try:
            for _ in range(count):
                queue_id = new_queue_id()
                fd = os.open(self.folder / f"{queue_id}.eml",
                             os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                made.append((queue_id, fd))
                write_all(fd, _ZEROS)
            # All at once (concurrent fsyncs share the journal's commits; one after the other,
            # each would wait for its own).
            for failed in self._syncs.map(try_fsync, [fd for _, fd in made]):
                if failed is not None:
                    raise failed
            fsync_path(self.folder)
            _still_named(made)
        except OSError as exc:  # the spool makes new files meanwhile; the next take retries
            log.warning("cannot make blank queue files in %s: %s", self.folder, exc)
            self._discard(made)
            return
        if self._closed:
            self._discard(made)
            return
        self._ready.extend(made)  # deque.extend: safe against the loop's popleft
        self.made += len(made)

    def reuse(self, files: list[Path]) -> list[Path]:
        """On the loop: take finished messages' files out of the queue folder, moving those
        from a blank's size up to REUSE_MAX into recycle/ (an open, an fstat and a rename
        each: nothing that waits for the disk; they are zeroed, synced, renamed and their
        folder synced REUSE_BATCH at a time in a thread, or sooner when the ready ones run
        low: the order in the module doc). Returns the others, for `remove` in a thread (an
        unlink may wait for the disk); every name in `files` but those is gone from the
        queue folder when this returns. Why on the loop: handing each flush's few files to
        a thread cost more (its wake-up and the GIL's hand-offs) than the renames:
        ``bench/fed_ab.sh`` measured CPU x0.96-0.97 a message (x0.87-0.89 for an earlier
        form), and a lone message's system calls went from 130 to 100."""
        left: list[Path] = []
        for file in files:
            full = len(self._ready) + len(self._recycled) >= 2 * self._keep
            if self._closed or full:  # bounds the files kept open
                left.append(file)
                continue
            try:
                fd = os.open(file, os.O_RDWR)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot reuse %s as a blank: %s", file, exc)
                left.append(file)
                continue
            try:
                info = os.fstat(fd)
                if not BLANK_SIZE <= info.st_size <= REUSE_MAX or info.st_nlink != 1:
                    raise ValueError("too small, too big or linked")  # a new file, say
                os.rename(file, self.recycle / file.name)
            except (OSError, ValueError):
                os.close(fd)
                left.append(file)
                continue
            self._recycled.append((file.name, fd, info.st_size))
        if len(self._recycled) < REUSE_BATCH and len(self._ready) >= self._keep // 2:
            return left
        moved, self._recycled = self._recycled, []
        if moved:
            with self._naming_lock:
                self.naming += 1
            self._syncs.submit(self._name_again, moved).add_done_callback(self._named)
        return left

    def _named(self, future: Future[None]) -> None:
        with self._naming_lock:
            self.naming -= 1
        if not future.cancelled() and future.exception() is not None:  # not an OSError
            log.error("cannot reuse finished queue files as blanks",
                      exc_info=future.exception())

    @staticmethod
    def remove(files: list[Path]) -> None:
        """Worker thread: unlink the finished files `reuse` left."""
        for file in files:
            remove_file(file)

    def _name_again(self, moved: list[tuple[str, int, int]]) -> None:
        """Worker thread: zero the files in recycle/, sync them, name them blanks in the
        queue folder and sync it; only then are they handed out."""
        made: list[tuple[str, int]] = []  # (queue id, fd): named blanks again
        try:
            for _, fd, size in moved:
                pwrite_all(fd, _REUSE_ZEROS[:size], 0)
            # One after the other in this thread: spread over the pool, each of the 32
            # woke a thread of its own and took the GIL from the loop to do it.
            for _, fd, _ in moved:
                failed = try_fdatasync(fd)
                if failed is not None:
                    raise failed
            for name, fd, _ in moved:
                queue_id = new_queue_id()
                os.rename(self.recycle / name, self.folder / f"{queue_id}.eml")
                made.append((queue_id, fd))
            fsync_path(self.folder)
            _still_named(made)
        except OSError as exc:  # fresh blanks are made instead; recycle/ is emptied at start
            log.warning("cannot reuse finished queue files as blanks: %s", exc)
            named = {fd for _, fd in made}
            for queue_id, _ in made:
                remove_file(self.folder / f"{queue_id}.eml")
            for name, fd, _ in moved:
                os.close(fd)
                if fd not in named:
                    remove_file(self.recycle / name)
            return
        self._ready.extend(made)  # deque.extend: safe against the loop's popleft
        self.reused += len(made)

    def _discard(self, blanks: list[tuple[str, int]]) -> None:
        for queue_id, fd in blanks:
            os.close(fd)
            remove_file(self.folder / f"{queue_id}.eml")

    def discard_ready(self) -> None:
        """Drop every ready blank (one was found removed, so its folder changed under fed:
        the others are no better); the next take makes new ones. Any thread."""
        while True:
            try:
                blank = self._ready.popleft()
            except IndexError:
                return
            self._discard([blank])

    def close(self) -> None:
        """Remove the blanks not handed out (a crash leaves them: start-up removes them)."""
        self._closed = True
        self._syncs.shutdown()
        ready = list(self._ready)
        self._ready.clear()
        self._discard(ready)
        recycled, self._recycled = self._recycled, []
        for name, fd, _ in recycled:  # finished messages, not yet blanks again
            os.close(fd)
            remove_file(self.recycle / name)
