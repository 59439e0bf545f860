"""mailferry/signals.py: a signal sets events through a helper thread, never in the handler.

The supervisor of ``fed serve --processes N`` once hung on SIGTERM: its handler called
``Event.set`` while the interrupted main thread was inside ``Event.wait`` holding the
Event's lock. These tests put the handler exactly there.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mailferry.signals import SignalEvents


def test_a_signal_sets_every_event_and_restore_puts_the_old_handler_back() -> None:
    stop, wake = threading.Event(), threading.Event()
    before = signal.getsignal(signal.SIGUSR1)
    events = SignalEvents(stop, wake, signums=(signal.SIGUSR1,))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.wait(5) and wake.wait(5)
        assert events.received == [signal.SIGUSR1]
    finally:
        events.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.timeout(30)
def test_the_handler_returns_while_the_interrupted_wait_holds_the_events_lock() -> None:
    """What the main thread holds at the instant a signal can land in ``Event.wait``: the
    Event's own lock. A handler calling ``Event.set`` blocks there forever (the pytest
    timeout fails this test then); this one returns at once and the event is set as soon
    as the lock is free."""
    stop = threading.Event()
    events = SignalEvents(stop, signums=(signal.SIGUSR1,))
    try:
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        lock = stop._cond  # type: ignore[attr-defined]  # Event's Condition, as in wait()
        with lock:
            started = time.monotonic()
            handler(signal.SIGUSR1, None)
            returned = time.monotonic() - started
        assert returned < 1.0
        assert stop.wait(5)
        assert events.received == [signal.SIGUSR1]
    finally:
        events.restore()


def test_many_signals_while_the_main_thread_waits_all_arrive_and_nothing_hangs() -> None:
    """Signals landing at every point of a loop of short waits (SIGALRM from an interval
    timer, 2,000 of them at most): every wait returns, the event ends up set."""
    stop = threading.Event()
    events = SignalEvents(stop, signums=(signal.SIGALRM,))
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        deadline = time.monotonic() + 2.0
        waits = 0
        while time.monotonic() < deadline and len(events.received) < 2000:
            stop.wait(0.0002)
            stop.clear()
            waits += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        events.restore()
    assert waits > 100 and len(events.received) > 100
