"""Per-source throttles: messages per second and bytes per second.

Why: providers cap what one client may pull (Gmail's IMAP bandwidth per day, Exchange
Online's per-user throttling, a small on-premises server an admin does not want to melt
during office hours). Going over gets connections dropped or accounts locked for hours,
which costs far more than going slower. One `Throttle` is shared by every mailbox copied
from the same source system, so ``--parallel 20`` does not mean twenty times the limit.

It is a token bucket: a burst of up to one second's worth is allowed, then callers wait
(asyncio sleep, no busy loop) until enough tokens have accrued. A message larger than one
second's byte budget is let through once the bucket is full, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import time

from mailferry.mail.imap.client import throttle_answer


def is_throttling(answer: str) -> bool:
    """Whether a server's answer (an error's text) says "slow down" (the IMAP client's
    one list: `mailferry.mail.imap.client.throttle_answer`)."""
    return throttle_answer(answer)


class Throttle:
    """A token bucket on messages/s and bytes/s; 0 or None means unlimited."""

    def __init__(self, messages_per_second: float | None = None,
                 bytes_per_second: float | None = None) -> None:
        self.mps = messages_per_second or 0.0
        self.bps = bytes_per_second or 0.0
        self._msgs = self.mps
        self._bytes = self.bps
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def throttled(self, reason: str) -> float:
        """The system said "slow down": seconds to pause before the next attempt (this
        process's bucket keeps no back-off; the fleet's, `reconciler.workers.fleet`,
        makes every worker wait)."""
        return 0.0

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return bool(self.mps or self.bps)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = now - self._stamp
        self._stamp = now
        self._msgs = min(self.mps, self._msgs + elapsed * self.mps)
        self._bytes = min(self.bps, self._bytes + elapsed * self.bps)

    async def take(self, size: int) -> None:
        """Wait until one message of `size` bytes may go."""
        if not self.limited:
            return
        async with self._lock:  # FIFO: waiters are served in order
            for _ in range(100_000):  # bounded: each round sleeps for the missing tokens
                self._refill()
                need_m = 1.0 if self.mps else 0.0
                need_b = float(min(size, self.bps)) if self.bps else 0.0
                wait = 0.0
                if need_m and self._msgs < need_m:
                    wait = max(wait, (need_m - self._msgs) / self.mps)
                if need_b and self._bytes < need_b:
                    wait = max(wait, (need_b - self._bytes) / self.bps)
                if wait <= 0:
                    self._msgs -= need_m
                    self._bytes -= float(size) if self.bps else 0.0
                    return
                await asyncio.sleep(min(wait, 1.0))
