"""Bounded waiting on a condition: the tests never sleep and then assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition", *,
             interval: float = 0.05, retry_on: tuple[type[Exception], ...] = ()) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail with an
    AssertionError naming `what` and the last value after `timeout` seconds. An exception in
    `retry_on` counts as "not yet" (a page swapped under a browser test)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(interval)


def wait_seconds(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """`wait_for`, returning how many seconds the condition took."""
    began = time.monotonic()
    wait_for(predicate, timeout, what, interval=0.1)
    return time.monotonic() - began
