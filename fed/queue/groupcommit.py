"""Group commit: many waiters, one round of fsyncs.

Why: an SMTP server may answer 250 only once the message is on disk (invariant 1), and an
fsync costs the same whether it covers one message or fifty. Sessions that reach DATA at
about the same time therefore share their fsyncs: each session submits its item and waits
on a future; one committer task takes *everything* submitted so far, makes the whole batch
durable (``write`` in a worker thread: file writes and fsyncs; then ``commit`` on the event
loop: the spool's hand-over to delivery), and resolves every future. There
is no timer: the batch is whatever arrived while the previous batch was syncing, so a lone
client pays exactly one round of syncs and fifty busy clients pay one round per batch, not
fifty. Two batches may be on their way at once (``overlap``): when a sync round is slow,
the next batch's files are written and synced meanwhile, and concurrent fsyncs share the
file system's journal commits.

A lone item that ``inline(item)`` says is cheap to make durable (the spool: a message that
fits a blank, one pwritev and one fdatasync without a journal commit) is written on the
loop itself when nothing else is queued or in flight: no hand-off to a thread and back,
no task of the committer's; the submitter's coroutine finishes without suspending. When
those writes take longer than INLINE_SLOW on average (a moving average over about the last
16: the disk is busy, and the loop must not wait on it), every item goes through the
thread for the next INLINE_PAUSE seconds. One slow write alone (the disk's spikes, a
millisecond or more once in a hundred) does not stop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("fed.groupcommit")

T = TypeVar("T")

# write(batch) -> one exception (or None) per item; runs in a worker thread.
WriteBatch = Callable[[Sequence[T]], list[BaseException | None]]
# commit(batch of written items) runs on the loop (it may await a sync in a thread);
# raising fails the whole batch, and commit must then have undone its own writes.
CommitBatch = Callable[[Sequence[T]], Awaitable[None]]
# undo(item) cleans up after an item that will not be acknowledged.
Undo = Callable[[T], None]
# inline(item): True if write([item]) is quick enough to run on the loop.
Inline = Callable[[T], bool]

INLINE_SLOW = 0.002  # seconds: inline writes slower than this on average ...
INLINE_PAUSE = 1.0  # ... sends every item through the thread for this long


class GroupCommitter(Generic[T]):
    """Batches submitted items through write (thread) then commit (loop)."""

    def __init__(self, write: WriteBatch[T], commit: CommitBatch[T], undo: Undo[T],
                 max_batch: int = 256, overlap: int = 2, inline: Inline[T] | None = None
                 ) -> None:
        self._write = write
        self._inline = inline
        self._inline_after = 0.0  # perf_counter time before which nothing goes inline
        self._inline_average = 0.0  # moving average of the inline writes' seconds
        self.inline = 0  # items written on the loop (statistics)
        self._writing = 0  # batches between taken and answered (their tasks outlive that)
        self._commit = commit
        self._undo = undo
        self._max_batch = max_batch
        self._overlap = overlap
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # statistics, for the log and the tests
        self.items = 0
        self.write_seconds = 0.0  # time in write (thread) and commit (loop + sync), summed
        self.commit_seconds = 0.0
        self.cycle_seconds = 0.0  # from taking a batch to answering it
        # The same for batches of one message only: what a lone client waits for. The
        # averages above mix them with the big batches of busy moments (one batch of 50
        # takes longer than one of 1, and is worth 50 answers).
        self.single_batches = 0
        self.single_write_seconds = 0.0
        self.single_cycle_seconds = 0.0

    def start(self) -> None:
        """Start the committer task on the running loop."""
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def submit(self, item: T) -> None:
        """Return once `item` is durable; raise if it could not be made durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if (not self._queue and not self._writing and self._inline is not None
                and self._task is not None and self._inline(item)
                and time.perf_counter() >= self._inline_after):
            self.inline += 1
            await self._one_batch([(item, future)], inline=True)  # does not suspend
        else:
            self._queue.append((item, future))
            self._wake.set()
        await future

    async def close(self) -> None:
        """Finish what was submitted, then stop."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._inflight:
            await asyncio.wait(self._inflight)
        while self._queue:  # submitted while we stopped: still owed an answer
            await self._one_batch(self._take())

    def _take(self) -> list[tuple[T, asyncio.Future[None]]]:
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # Up to `overlap` batches at once: the next batch's files are written and
                # synced while the previous batch's sync round is still running.
                while len(self._inflight) >= self._overlap:
                    self._slot.clear()
                    await self._slot.wait()
                task = asyncio.create_task(self._one_batch(self._take()))
                self._inflight.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot.set()

    async def _one_batch(self, batch: list[tuple[T, asyncio.Future[None]]],
                         inline: bool = False) -> None:
        items = [item for item, _ in batch]
        started = time.perf_counter()
        self._writing += 1
        try:
            errors = self._write(items) if inline else await asyncio.to_thread(
                self._write, items)
        except BaseException as exc:  # the writer itself broke: nobody is durable
            errors = [exc] * len(items)
        wrote = time.perf_counter() - started
        if inline:
            self._inline_average += (wrote - self._inline_average) / 16
            if self._inline_average > INLINE_SLOW:
                self._inline_after = started + wrote + INLINE_PAUSE
                self._inline_average = 0.0
        self.write_seconds += wrote
        written = [(item, fut) for (item, fut), err in zip(batch, errors, strict=True)
                   if err is None]
        failed = [(item, fut, err) for (item, fut), err in zip(batch, errors, strict=True)
                  if err is not None]
        if written:
            committing = time.perf_counter()
            try:
                await self._commit([item for item, _ in written])
            except Exception as exc:
                failed += [(item, fut, exc) for item, fut in written]
                written = []
            self.commit_seconds += time.perf_counter() - committing
        cycle = time.perf_counter() - started
        self.cycle_seconds += cycle
        if len(batch) == 1:
            self.single_batches += 1
            self.single_write_seconds += wrote
            self.single_cycle_seconds += cycle
        self._writing -= 1
        for item, fut, err in failed:
            try:
                self._undo(item)
            except OSError:
                log.exception("cleaning up after a failed spool write")
            if not fut.done():
                fut.set_exception(err)
        for _, fut in written:
            if not fut.done():
                fut.set_result(None)
        self.batches += 1
        self.items += len(batch)
