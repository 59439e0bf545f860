"""How hard the mover may use one mail system: its connection limits, its daily byte
budget, and the adaptive back-off after it said "slow down".

Why: hosted systems ration their users. Gmail allows 15 IMAP connections per user and
about 2.5 GB downloaded and 500 MB uploaded a day; Exchange Online counts connections per
user and per server and answers `NO [THROTTLED]`, `[UNAVAILABLE]`, "Server Unavailable"
or an early `BYE` when a client takes more than its share. imapsync's lesson is that a
migration which answers such a refusal with an immediate reconnect at full speed is locked
out for hours, and one that fails on it is restarted by hand at night. So the mover:

- never holds more than `connections` connections to a system at once, nor more than
  `per_user` for one mailbox (`connect` waits for a slot, `disconnect` frees it);
- on a throttling answer (`throttled`) halves the connections it allows itself (copies
  over the new number give theirs back at their next message, `shed`, and resume later) and its
  message rate (measured over the last seconds), at most once per `settle` seconds (one
  refusal per connection in flight is one signal, not six), and reconnects only after a
  growing pause (or the one the server suggests, Exchange Online's "Suggested Backoff
  Time", if longer); then recovers *slowly*: one more connection and a rate 1.5 times higher
  per `recover_every` seconds without a refusal, until the limits are gone again;
- stops copying for the day once `bytes_per_day` were sent to or read from the system
  (`reserve`), and says until when (`BudgetSpent`; the step waits for the next UTC day).

`SystemPace` is the interface the endpoints, the pipeline and the runner use; `LocalPace`
keeps the state in this process (one per system, shared by every copy of the process).
Workers on several hosts share a system's limits through the state store instead: another
implementation of the same interface, nothing else changes.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mailferry.mail.imap.client import ImapThrottled
from reconciler.mover.throttle import Throttle


@dataclass(frozen=True)
class Limits:
    """A system's limits from the policy (`systemLimits`); None or 0: no limit."""

    connections: int | None = None  # at once, to the whole system
    per_user: int | None = None  # at once, to one mailbox
    bytes_per_day: int | None = None  # read from or written to it, per UTC day


@dataclass(frozen=True)
class Backoff:
    """The adaptive back-off's tuning (the defaults suit hosted systems; tests shorten)."""

    base: float = 2.0  # pause before reconnecting after the first refusal, doubled per one
    cap: float = 120.0  # longest pause
    settle: float = 1.0  # seconds during which further refusals reduce nothing more
    recover_every: float = 30.0  # seconds without a refusal per recovery step
    window: float = 5.0  # seconds over which the message rate is measured
    min_rate: float = 1.0  # messages/s the rate is never cut below


class BudgetSpent(Exception):
    """A system's daily byte budget is spent: the copy stops and resumes at `resume_at`."""

    def __init__(self, system: str, spent: int, budget: int, resume_at: datetime) -> None:
        super().__init__(
            f"daily budget of system {system} spent ({spent:,} of {budget:,} bytes today); "
            f"the copy resumes at {resume_at:%Y-%m-%d %H:%M} UTC")
        self.system, self.spent, self.budget, self.resume_at = system, spent, budget, resume_at


class Shed(ImapThrottled):
    """Raised by a copy to give its connection back: its system asked for fewer connections
    than are open (`SystemPace.shed`). Not a new refusal: the copy reconnects when a slot
    is free and resumes from the manifest."""


class SystemPace(Protocol):
    """How hard the mover may use one system, now (the module's docstring)."""

    system: str

    async def connect(self, user: str) -> None:
        """Wait for a connection slot for `user`'s mailbox."""

    def disconnect(self, user: str) -> None:
        """Free the slot `connect` gave."""

    @property
    def pooling(self) -> bool:
        """Whether idle connections may be kept open (no connection limit in force)."""

    def shed(self) -> bool:
        """Whether the caller should close its connection now (more are open than the
        back-off allows); each True is one connection fewer."""

    async def take(self, size: int) -> None:
        """Wait until one more message of `size` bytes may go to or from the system."""

    def reserve(self, size: int) -> bool:
        """Count `size` bytes against today's budget; False when they do not fit."""

    def spent(self) -> BudgetSpent:
        """The budget's state, as the error a copy stops with."""

    def throttled(self, reason: str) -> float:
        """The system refused us for being too much: slow down; seconds to pause."""

    def state(self) -> dict[str, object]:
        """The current limits, for reports and the benchmark."""


_SUGGESTED = re.compile(r"Suggested Backoff Time: (\d+) milliseconds", re.IGNORECASE)


def suggested(reason: str) -> float:
    """The pause a server asked for in its refusal (Exchange Online: "Suggested Backoff
    Time: 1000 milliseconds"), in seconds, at most an hour; 0 when it named none."""
    match = _SUGGESTED.search(reason)
    return min(3600.0, int(match.group(1)) / 1000) if match else 0.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class LocalPace:
    """A `SystemPace` kept in this process (use from one event loop)."""

    def __init__(self, system: str, limits: Limits | None = None, *,
                 backoff: Backoff | None = None, messages_per_second: float | None = None,
                 bytes_per_second: float | None = None,
                 clock: Callable[[], datetime] = utcnow,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.system = system
        self.limits = limits or Limits()
        self.backoff = backoff or Backoff()
        self.clock, self.monotonic = clock, monotonic
        self.configured_rate = messages_per_second or None
        self.bucket = Throttle(messages_per_second, bytes_per_second)
        self.active = 0
        self.users: Counter[str] = Counter()
        self.allowed: int | None = None  # adaptive connection cap (None: none)
        self.rate: float | None = None  # adaptive messages/s cap (None: none)
        self.strikes = 0  # refusals not yet forgiven by recovery
        self.refusals = 0  # every refusal seen (reports)
        self._peak: tuple[int, float] = (0, 0.0)  # connections and rate before the back-off
        self._reduced = -math.inf  # monotonic time of the last reduction
        self._recovered = -math.inf
        self._times: deque[float] = deque()  # monotonic times of recent messages
        self._free = asyncio.Condition()
        self._shedding = 0  # connections told to close that have not closed yet
        self._day = ""
        self._spent = 0

    # -- connections ----------------------------------------------------------------------
    def _cap(self) -> int | None:
        caps = [c for c in (self.limits.connections or None, self.allowed) if c]
        return min(caps) if caps else None

    def _may_connect(self, user: str) -> bool:
        cap = self._cap()
        per_user = self.limits.per_user or None
        return (cap is None or self.active < cap) and \
            (per_user is None or self.users[user] < per_user)

    async def connect(self, user: str) -> None:
        self._recover()
        async with self._free:
            for _ in range(1_000_000):  # bounded: each round waits for a disconnect
                if self._may_connect(user):
                    break
                try:
                    await asyncio.wait_for(self._free.wait(), self.backoff.recover_every)
                except TimeoutError:
                    self._recover()  # recovery may open a slot while nobody disconnects
            self.active += 1
            self.users[user] += 1

    def disconnect(self, user: str) -> None:
        self.active = max(0, self.active - 1)
        self._shedding = max(0, self._shedding - 1)
        self.users[user] -= 1
        if self.users[user] <= 0:
            del self.users[user]
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._free:
            self._free.notify_all()

    @property
    def pooling(self) -> bool:
        return self._cap() is None and not self.limits.per_user

    def shed(self) -> bool:
        cap = self._cap()
        if cap is None or self.active - self._shedding <= cap:
            return False
        self._shedding += 1
        return True

    # -- rate -------------------------------------------------------------------------------
    def observed(self) -> float:
        """Messages per second over the last `window` seconds."""
        now = self.monotonic()
        while self._times and self._times[0] < now - self.backoff.window:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        return len(self._times) / max(now - self._times[0], 0.1)

    def _apply_rate(self) -> None:
        caps = [r for r in (self.configured_rate, self.rate) if r]
        self.bucket.mps = min(caps) if caps else 0.0
        self.bucket._msgs = min(self.bucket._msgs, self.bucket.mps)  # no old burst

    async def take(self, size: int) -> None:
        self._recover()
        await self.bucket.take(size)
        now = self.monotonic()
        self._times.append(now)
        while self._times[0] < now - self.backoff.window:  # bounded by the window's rate
            self._times.popleft()

    # -- the daily budget -----------------------------------------------------------------
    def _today(self) -> None:
        day = self.clock().astimezone(UTC).date().isoformat()
        if day != self._day:
            self._day, self._spent = day, 0

    def reserve(self, size: int) -> bool:
        budget = self.limits.bytes_per_day
        if not budget:
            return True
        self._today()
        # A message bigger than a whole day's budget goes alone at the start of a day, or
        # it would never go.
        if self._spent + size > budget and self._spent > 0:
            return False
        self._spent += size
        return True

    def spent(self) -> BudgetSpent:
        self._today()
        start = datetime.fromisoformat(self._day).replace(tzinfo=UTC)
        return BudgetSpent(self.system, self._spent, self.limits.bytes_per_day or 0,
                           start + timedelta(days=1))

    # -- refusals ---------------------------------------------------------------------------
    def throttled(self, reason: str) -> float:
        now = self.monotonic()
        self.refusals += 1
        self.strikes += 1
        self._recovered = now  # recovery counts from the last refusal
        if now - self._reduced >= self.backoff.settle:
            self._reduced = now
            in_use = max(self.active, 1)
            seen = self.observed()
            if self.allowed is None and self.rate is None:
                self._peak = (in_use, seen)
            self.allowed = max(1, min(self.allowed or in_use, in_use) // 2)
            current = min(r for r in (self.rate, seen or None, math.inf) if r)
            if current != math.inf:
                self.rate = max(self.backoff.min_rate, current / 2)
                self._apply_rate()
        pause = min(self.backoff.cap, self.backoff.base * 2.0 ** min(self.strikes - 1, 30))
        return max(pause, suggested(reason))

    def _recover(self) -> None:
        """One step back up per `recover_every` seconds without a refusal."""
        now = self.monotonic()
        if self.allowed is None and self.rate is None:
            self.strikes = 0
            return
        if now - self._recovered < self.backoff.recover_every:
            return
        self._recovered = now
        self.strikes = max(0, self.strikes - 1)
        if self.allowed is not None:
            self.allowed += 1
            if self.allowed >= max(self._peak[0], self.limits.connections or 0):
                self.allowed = None
        if self.rate is not None:
            self.rate *= 1.5
            if self.rate >= self._peak[1]:
                self.rate = None
            self._apply_rate()
        if self.allowed is None:
            asyncio.get_running_loop().create_task(self._notify())

    def state(self) -> dict[str, object]:
        return {"system": self.system, "connections": self.active, "allowed": self._cap(),
                "rate": round(self.rate, 1) if self.rate else None, "refusals": self.refusals,
                "spent_today": self._spent, "budget": self.limits.bytes_per_day}
