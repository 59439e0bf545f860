"""SIGTERM and SIGINT turned into ``threading.Event``s without a lock in the handler.

Why: Python runs a signal handler in the main thread between two bytecodes, possibly inside
``Event.wait`` right after it took the Event's lock; a handler that calls ``Event.set``
then waits for that same lock forever. fed's supervisor (``fed serve --processes N``) hung
so on SIGTERM, about once in a hundred stops under ``bench/fed_profile.sh``; ``reconcile
--watch`` had the same handler. Here the handler only notes the signal and writes a byte to
a pipe (non-blocking: it never waits); a daemon thread reading that pipe sets the events,
as any other thread may (it waits for the lock like everyone else: no re-entrance).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalEvents:
    """While installed, each of `signums` sets every one of `events`; `received` lists the
    signals in the order they came. Call from the main thread (Python's rule for handlers);
    `restore` puts the previous handlers back and ends the helper thread."""

    def __init__(self, *events: threading.Event,
                 signums: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.events = events
        self.received: list[int] = []
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._relay, name="signal-relay", daemon=True)
        self._thread.start()
        self._previous = {signum: signal.signal(signum, self._handler) for signum in signums}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)  # a list append: no lock
        with contextlib.suppress(BlockingIOError, OSError):  # full: a byte is waiting already
            os.write(self._write, b"\0")

    def _relay(self) -> None:
        """The helper thread: one read per wake-up, until `restore` closes the pipe."""
        while os.read(self._read, 64):
            for event in self.events:
                event.set()
        os.close(self._read)

    def restore(self) -> None:
        """The previous handlers again; the helper thread ends."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self._write >= 0:
            os.close(self._write)  # the thread's read returns b"": it ends
            self._write = -1
        self._thread.join(5)
