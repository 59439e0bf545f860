"""What every step gets and returns.

A step function runs one arrow of the state machine for one migration: it first looks at the
real components (is BOX2 already there? is the hold already active?) and acts only where the
world is not yet as the step wants it, so running it twice is harmless (invariant 4). It
returns an `Outcome`; the engine then records the new state and the event in one
transaction. A step signals "not yet" with `NotReady`, "retry later" with `TemporaryError`
and "stop this migration" with `PermanentError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from reconciler.drivers.base import MailSystemDriver, physical_address
from reconciler.errors import TemporaryError
from reconciler.fedclient import FedClient
from reconciler.mover.progress import Progress
from reconciler.spec.model import DesiredMailbox, SpecSet
from reconciler.state.model import Migration


@dataclass
class PassCache:
    """Work done once per engine pass, shared by the steps of that pass."""

    upsynced: set[str] = field(default_factory=set)  # up-synced since their last change
    changed: set[str] = field(default_factory=set)  # address lists changed in this pass
    downsync_needed: bool = False


@dataclass
class StepContext:
    """The world as a step sees it."""

    specs: SpecSet
    fed: FedClient
    drivers: dict[str, MailSystemDriver]
    session: Session
    now: datetime
    cache: PassCache
    desired: DesiredMailbox | None = None
    log: Callable[[str], None] = lambda _line: None
    progress: Progress | None = None  # the engine's copy figures (live display, status page)

    def driver(self, system: str) -> MailSystemDriver:
        try:
            return self.drivers[system]
        except KeyError:
            raise TemporaryError(f"no driver for system {system!r} (not in the specs)") from None

    def changed(self, system: str) -> None:
        """This step changed `system`'s address list: up-sync it again (at the latest when
        the pass ends, so that a pass creating many mailboxes up-syncs once, not per box)."""
        self.cache.upsynced.discard(system)
        self.cache.changed.add(system)

    def upsync(self, system: str) -> None:
        """E6 for one system: send fed every mailbox it hosts with its addresses.

        Skipped when the system was up-synced in this pass and has not changed since: E5-E8
        of many mailboxes in one pass share one up-sync per system."""
        if system in self.cache.upsynced:
            return
        accounts = self.driver(system).list_accounts()
        self.fed.upsync(system, {a.physical_address: list(a.all_addresses) for a in accounts})
        self.cache.upsynced.add(system)
        self.cache.changed.discard(system)
        self.cache.downsync_needed = True


@dataclass
class Outcome:
    """A step's result: the state to record (None: no transition) and the event's detail."""

    to_state: int | None
    label: str
    detail: dict[str, Any] = field(default_factory=dict)


StepFunction = Callable[[StepContext, Migration], Outcome]


def old_physical(m: Migration) -> str:
    """ADP1: the old mailbox's physical address."""
    return physical_address(m.source_system, m.source_mailbox)


def new_physical(m: Migration) -> str:
    """ADP2: the new mailbox's physical address."""
    return physical_address(m.target_system, m.target_mailbox)


def addresses_of(m: Migration) -> list[str]:
    """AD1 and its aliases: everything that moves with the mailbox."""
    return [m.address, *m.aliases]
