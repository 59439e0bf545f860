"""What every step gets and returns.

A step function runs one arrow of the state machine for one migration: it first looks at the
real components (is BOX2 already there? is the hold already active?) and acts only where the
world is not yet as the step wants it, so running it twice is harmless (invariant 4). It
returns an `Outcome`; the engine then records the new state and the event in one
transaction. A step signals "not yet" with `NotReady`, "retry later" with `TemporaryError`
and "stop this migration" with `PermanentError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from reconciler.drivers.base import MailSystemDriver, physical_address
from reconciler.errors import TemporaryError
from reconciler.fedclient import FedClient
from reconciler.mover.manifest import Manifest
from reconciler.mover.progress import Progress
from reconciler.mover.throttle import Throttle
from reconciler.spec.model import DesiredMailbox, SpecSet
from reconciler.state.model import Migration


@dataclass
class PassCache:
    """Work done once per engine pass, shared by the steps of that pass."""

    upsynced: set[str] = field(default_factory=set)  # up-synced since their last change
    pinged: dict[str, float] = field(default_factory=dict)  # system -> monotonic time
    changed: set[str] = field(default_factory=set)  # address lists changed in this pass
    downsync_needed: bool = False
    # The addresses whose create / E1 had an error when the pass observed the store (None:
    # not known, as for a saved plan). An address not among them has none now either: only
    # the lease holder records them, for the change it runs, and each address has one
    # change a pass -- so its step need not ask the store (a round trip a mailbox).
    address_errors: frozenset[str] | None = None


# The data part of a step (a copy, a verification): what a worker runs for it. It returns
# the event's detail or raises like a step; it changes no state.
DataPart = Callable[["StepContext", Migration], dict[str, Any]]


class DataJobs(Protocol):
    """Where the data parts of steps run when not in this process: the workers' queue
    (`reconciler.workers.queue`). `offload` returns the part's detail once a worker has
    finished it (in `ctx.session`: the caller's transaction records the transition),
    raises the error the worker met, or raises NotReady while it is queued or running."""

    def offload(self, ctx: StepContext, m: Migration, step: str) -> dict[str, Any]: ...


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
    # Workers: the data parts are queued for them (None: they run here, as by default).
    jobs: DataJobs | None = None
    # In a worker: manifest rows committed batch by batch (a killed worker's successor
    # resumes from them), and the fleet's pace for a system instead of this process's.
    worker: bool = False
    pace: Callable[[str, Migration], Throttle] | None = None

    def data(self, m: Migration, step: str, part: DataPart) -> dict[str, Any]:
        """The data part of `step`: run here, or by a worker when workers are in use."""
        if self.jobs is not None:
            return self.jobs.offload(self, m, step)
        return part(self, m)

    def manifest(self, m: Migration) -> Manifest:
        """The mover's manifest of `m`: in the step's transaction here (kept with its
        event); in a worker, committed as the copy goes (the session's store)."""
        if self.worker:
            bind = self.session.get_bind()
            return Manifest(_sessions_of(bind), m.id)
        return Manifest.in_session(self.session, m.id)

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

    def ping(self, system: str, fresh: float = 5.0) -> None:
        """The system's ping, unless it answered one less than `fresh` seconds ago in this
        pass (E9 follows E5 at once, inside the hold: the same checks twice would only
        lengthen the hold)."""
        last = self.cache.pinged.get(system)
        if last is not None and time.monotonic() - last < fresh:
            return
        self.driver(system).ping()
        self.cache.pinged[system] = time.monotonic()

    def prove_delivery(self, system: str, physical: str, m: Migration, step: str) -> None:
        """After a change to `system`'s tables, before fed may route `physical` there: fed
        retires every connection it keeps open to the system (a Postfix smtpd serves a
        session from the tables it had when the session began) and checks on a fresh
        session that the system takes `physical` (RCPT accepted). A refusal is a
        TemporaryError naming the address, the step and the system's reply: the step waits
        and retries, nothing is flipped to a mailbox its system refuses (invariant 9)."""
        try:
            self.fed.refresh_system(system, [physical])
        except TemporaryError as exc:
            raise TemporaryError(f"{exc}; not routing mail there yet", delay=exc.delay,
                                 address=m.address, step=step) from exc

    def upsync(self, system: str) -> None:
        """E6 for one system: send fed every mailbox it hosts with its addresses.

        Skipped when the system was up-synced in this pass and has not changed since: E5-E8
        of many mailboxes in one pass share one up-sync per system. fed first retires its
        pooled connections to the system: the up-sync may route mail to mailboxes the system
        only just created, which an older session of its Postfix would refuse."""
        if system in self.cache.upsynced:
            return
        self.fed.refresh_system(system)
        accounts = self.driver(system).list_accounts()
        self.fed.upsync(system, {a.physical_address: list(a.all_addresses) for a in accounts})
        self.cache.upsynced.add(system)
        self.cache.changed.discard(system)
        self.cache.downsync_needed = True


def _sessions_of(bind: Any) -> Callable[[], Any]:
    """Committing sessions on `bind` (an Engine): one transaction per use."""
    @contextmanager
    def sessions() -> Iterator[Session]:
        with Session(bind) as session, session.begin():
            yield session
    return sessions


@dataclass
class Outcome:
    """A step's result: the state to record (None: no transition) and the event's detail."""

    to_state: int | None
    label: str
    detail: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # the line apply prints for it, when the label is not enough
    # The row the event belongs to: the migration the step ran on, or the one E1 recorded
    # (None for a create: the address has no migration).
    migration: Migration | None = None


# The two kinds of step (`reconciler.steps.registry` runs both): one arrow of a recorded
# migration, or a step for a desired address that has no migration row yet.
MigrationStep = Callable[[StepContext, Migration], Outcome]
AddressStep = Callable[[StepContext, DesiredMailbox], Outcome]


def old_physical(m: Migration) -> str:
    """ADP1: the old mailbox's physical address."""
    return physical_address(m.source_system, m.source_mailbox)


def new_physical(m: Migration) -> str:
    """ADP2: the new mailbox's physical address."""
    return physical_address(m.target_system, m.target_mailbox)


def addresses_of(m: Migration) -> list[str]:
    """AD1 and its aliases: everything that moves with the mailbox."""
    return [m.address, *m.aliases]
