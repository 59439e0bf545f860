"""Per-address holds (patent E8/E9) and the in-flight counts that make them honest.

A hold is only worth something if, once the hold call has returned, nothing more is
delivered for the held addresses: the reconciler flips the directory right after, and a
delivery that started before the hold and finishes after the flip would put mail in the
old mailbox (breaking invariant 2). So:

- the delivery scheduler checks ``is_held`` and calls ``begin`` in the same synchronous
  stretch of code on the event loop (no ``await`` between them), so a delivery either
  started before the hold was set or never starts;
- ``wait_idle`` then waits until every delivery that did start has ended (``end``).

Holds are persisted in the store so that a restarted fed keeps them: a crash during a
migration must not release mail to the old mailbox.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable

from .store import Store


class Holds:
    """Held addresses (persisted) and in-flight delivery counts (in memory)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: dict[str, float] = {
            str(r["address"]): float(r["since"]) for r in store.query("SELECT * FROM holds")
        }
        self.inflight: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    def is_held(self, *addresses: str) -> bool:
        """True if any of these addresses is held."""
        return any(a in self.held for a in addresses)

    def hold(self, addresses: Iterable[str]) -> dict[str, float]:
        """Hold the addresses (an existing hold keeps its start time); return their starts."""
        now = time.time()
        with self.store.transaction() as db:
            for address in addresses:
                db.execute(
                    "INSERT OR IGNORE INTO holds (address, since) VALUES (?, ?)", (address, now)
                )
                self.held.setdefault(address, now)
        return {a: self.held[a] for a in addresses}

    def release(self, addresses: Iterable[str]) -> list[str]:
        """Clear the holds; return the addresses that were held."""
        released: list[str] = []
        with self.store.transaction() as db:
            for address in addresses:
                db.execute("DELETE FROM holds WHERE address = ?", (address,))
                if self.held.pop(address, None) is not None:
                    released.append(address)
        return released

    def begin(self, addresses: Iterable[str]) -> None:
        """A delivery for these addresses starts (call right after checking is_held)."""
        self.inflight.update(addresses)

    async def end(self, addresses: Iterable[str]) -> None:
        """A delivery for these addresses has finished, successfully or not."""
        self.inflight.subtract(addresses)
        self.inflight += Counter()  # drop zero counts
        async with self._changed:
            self._changed.notify_all()

    def busy(self, addresses: Iterable[str]) -> int:
        """Deliveries in flight for these addresses."""
        return sum(self.inflight.get(a, 0) for a in addresses)

    async def wait_idle(self, addresses: list[str], timeout: float) -> bool:
        """Wait until no delivery is in flight for the addresses; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.busy(addresses) == 0), timeout
                )
            except TimeoutError:
                return False
        return True
