"""The engine: observe, plan, run what is due, record it — until nothing more is due now.

One *pass* observes the world (the state store's migrations, fed's directory), computes the
pure plan and runs every change due now, each in its own transaction: the step looks at the
real component, acts where needed, and only then are the new state and its event committed
together. A step that fails temporarily leaves the state as it was and records the error
with a growing back-off; a permanent failure -- a PermanentError, or a step past its retry
limit or timeout (`reconciler.steps.registry`) -- freezes the migration with its reason (the
plan shows it as a `!` line, an admin decides). A `create` or `E1` has no migration row yet:
its back-off and failure are kept in `address_errors`. A kill -9 at any instant therefore
leaves either the old state (the step will check the world and redo only what is missing)
or the new one. A pass's closing up-syncs and down-sync are retried at the next pass when
they fail, and reported. `LeaseLost` (fed fenced us out) stops apply, recording nothing.

`apply()` repeats passes while they make progress: one step often makes the next one due at
once (E4 -> E5-E8 -> E9 in a few hundred milliseconds, which keeps holds short).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from reconciler.drivers.base import MailSystemDriver, mailbox_id_for, physical_address
from reconciler.errors import (
    LeaseLost,
    MailferryError,
    ManualStep,
    NotReady,
    PermanentError,
    StepError,
    TemporaryError,
    Waiting,
)
from reconciler.fedclient import FedClient, FlipResult, Refusal
from reconciler.fit import window_warnings_for
from reconciler.mover.progress import Progress
from reconciler.plan import AddressErrorView, Change, MigrationView, Plan, make_plan, purge_due
from reconciler.spec.model import DesiredMailbox, SpecSet
from reconciler.state.model import (
    AddressError,
    Event,
    Migration,
    PlacementSuspension,
    shared_modes,
    utcnow,
)
from reconciler.state.states import MigrationState
from reconciler.state.store import Store, record_event, record_transition
from reconciler.steps import cutover
from reconciler.steps.base import DataJobs, Outcome, PassCache, StepContext, new_physical
from reconciler.steps.registry import StepSpec, current_row, step_for

log = logging.getLogger("mailferry.engine")


def _failpoint(step: str, where: str) -> None:
    """Test hook: `MAILFERRY_FAILPOINT=E9:after-action` kills this process right there."""
    if os.environ.get("MAILFERRY_FAILPOINT") == f"{step}:{where}":
        os.kill(os.getpid(), signal.SIGKILL)


class WorkerQueue(DataJobs, Protocol):
    """The workers' queue as the engine sees it (`reconciler.workers.queue.Queue`)."""

    def wait(self, stop: Callable[[], bool]) -> bool:
        """Wait until a worker finished a job the reconciler has not turned into a
        transition yet: True then, False at once when no job is outstanding (or on stop)."""
        ...


@dataclass
class StepRecord:
    """What happened to one change during apply (for the CLI's output)."""

    address: str
    step: str
    ok: bool
    to_state: int | None = None
    message: str = ""
    at: datetime | None = None


@dataclass(frozen=True)
class Observed:
    """The actual state a plan is made from (saved plans digest exactly this)."""

    migrations: list[MigrationView]
    directory: dict[str, str]
    suspended: frozenset[str]
    # What a read-only look could not reach (fed without its token, fed down): said next to
    # the plan, never a reason to fail it. Always empty for an apply.
    unreached: tuple[str, ...] = ()
    address_errors: dict[str, AddressErrorView] = field(default_factory=dict)


@dataclass
class ApplyReport:
    records: list[StepRecord] = field(default_factory=list)
    passes: int = 0

    @property
    def applied(self) -> int:
        return sum(1 for r in self.records if r.ok)

    @property
    def errors(self) -> list[StepRecord]:
        return [r for r in self.records if not r.ok]


def _own(change: Change) -> bool:
    """True when the change acts on its `migration_id` (a move back names the old one)."""
    return change.migration_id is not None and change.action not in ("create", "migrate")


_VIEW_COLUMNS = (
    Migration.id, Migration.address, Migration.source_system, Migration.target_system,
    Migration.state, Migration.state_since, shared_modes(), Migration.placement,
    Migration.failed_reason, Migration.failed_step, Migration.next_attempt_at,
    Migration.last_error, Migration.station, Migration.station_action, Migration.suspended,
    Migration.purged, Migration.source_mailbox, Migration.mailbox_size, Migration.manual_step,
)


def read_migrations(store: Store) -> list[MigrationView]:
    """Every migration as a plan snapshot, oldest first: plain rows, not ORM objects (a
    third of the time at 100,000 rows), their modes shared per distinct text."""
    with store.session() as session:
        # Core, not the ORM's select: the same rows without its per-row loading machinery.
        rows = session.connection().execute(select(*_VIEW_COLUMNS).order_by(Migration.id))
        # Positional: _VIEW_COLUMNS lists MigrationView's fields in order (a test checks);
        # building each row's mapping was a third of this read.
        return [MigrationView(*row) for row in rows]


def view(m: Migration) -> MigrationView:
    """A detached snapshot of a migration row for the pure plan."""
    return MigrationView(
        id=m.id, address=m.address, source_system=m.source_system,
        target_system=m.target_system, state=m.state, state_since=m.state_since,
        modes=m.modes, placement=m.placement, failed_reason=m.failed_reason,
        failed_step=m.failed_step, next_attempt_at=m.next_attempt_at,
        last_error=m.last_error, station=m.station, station_action=m.station_action,
        suspended=m.suspended, purged=m.purged, source_mailbox=m.source_mailbox,
        mailbox_size=m.mailbox_size, manual_step=m.manual_step,
    )


class Engine:
    """Runs the reconcile loop against one spec set, state store, fed and set of drivers."""

    def __init__(
        self, specs: SpecSet, store: Store, fed: FedClient,
        drivers: dict[str, MailSystemDriver], *, clock: Callable[[], datetime] = utcnow,
        on_record: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self.specs = specs
        self.store = store
        self.fed = fed
        self.drivers = drivers
        self.clock = clock
        self.on_record = on_record
        self.desired: dict[str, DesiredMailbox] = specs.desired()
        self._systems_registered = False
        # Why fed cannot be asked at all (its token is not set): a read-only command still
        # plans from the state store; an apply refuses with this reason.
        self.fed_unavailable: str | None = None
        # Checked between two changes: True stops apply after the current step (SIGTERM in
        # --watch, a lost lease).
        self.should_stop: Callable[[], bool] = lambda: False
        self.lease_lost: LeaseLost | None = None  # fed fenced us out: nothing more is run
        # A pass's closing up-syncs / down-sync that failed: done first in the next pass.
        self._upsync_pending: set[str] = set()
        self._downsync_pending = False
        # Figures of the copies this engine runs (E15): the terminal display and the status
        # page served by the same process read them while a copy is running.
        self.progress: Progress = Progress()
        # Workers (`reconcile --apply --workers`): the data parts of steps are queued for
        # `reconcile worker` processes; None runs them in this process (the default).
        self.jobs: WorkerQueue | None = None

    # -- observe + plan -------------------------------------------------------------------
    def migrations(self) -> list[MigrationView]:
        """Every migration record, oldest first (purged ones too: they tell a move back)."""
        return read_migrations(self.store)

    def suspended(self) -> frozenset[str]:
        """The placements an admin suspended."""
        with self.store.session() as session:
            return frozenset(session.scalars(select(PlacementSuspension.placement)))

    def address_errors(self) -> dict[str, AddressErrorView]:
        """The back-off or failure of every `create` / `E1` that failed."""
        with self.store.session() as session:
            return {e.address: AddressErrorView(e.step, e.last_error, e.next_attempt_at,
                                                e.failed_reason, e.manual_step)
                    for e in session.scalars(select(AddressError))}

    def observe(self, *, best_effort: bool = False) -> Observed:
        """One snapshot of the actual state: migrations, fed's directory, suspensions.

        `best_effort` (plan, status: nothing is changed) reads what it can: fed's directory
        missing (no token, fed down) leaves it empty and says so in `unreached`."""
        if self.fed_unavailable is not None and not best_effort:
            raise PermanentError(self.fed_unavailable)
        unreached: tuple[str, ...] = ()
        directory: dict[str, str] = {}
        if self.fed_unavailable is not None:
            unreached = (self.fed_unavailable,)
        elif best_effort:
            try:
                directory = self.fed.directory().entries
            except MailferryError as exc:
                unreached = (str(exc),)
        else:
            directory = self.fed.directory().entries
        if unreached:
            unreached = tuple(f"fed's directory not read ({why}): addresses fed already "
                              f"routes are not checked" for why in unreached)
        return Observed(self.migrations(), directory, self.suspended(), unreached,
                        self.address_errors())

    def plan(self, at: datetime | None = None, *, observed: Observed | None = None,
             estimates: bool = False) -> Plan:
        """The plan at `at` (default now) from the live world (or a given snapshot).

        `estimates` adds the window-fit warnings (measured rates, mailbox sizes)."""
        now = at or self.clock()
        seen = observed or self.observe()
        plan = make_plan(self.desired, seen.migrations, seen.directory, now, seen.suspended,
                         seen.address_errors)
        if estimates:
            plan.warnings.extend(window_warnings_for(
                self.store, self.drivers, self.desired, plan, seen.migrations, seen.directory))
            plan.warnings.extend(
                f"{address}: {r.system} refuses {r.physical}, where fed's directory routes "
                f"its mail ({r.count} deliveries deferred since {r.first}, last {r.last}: "
                f"{r.reply}); fed retries and bounces only after its queue lifetime: fix the "
                "system" for address, r in self.refusals(seen.migrations))
        plan.warnings.extend(seen.unreached)
        return plan

    def refusals(self, migrations: list[MigrationView] | None = None
                 ) -> list[tuple[str, Refusal]]:
        """(address, refusal) for every physical address a managed system answered 5xx for
        in the last hour (fed deferred them: invariant 9), named by the migration it belongs
        to or else by fed's directory. Empty if fed cannot say (an older fed, unreachable)."""
        try:
            found = self.fed.refusals()
        except StepError:
            return []
        if not found:  # the usual case: no migration record read for nothing
            return []
        names: dict[str, str] = {}
        for m in self.migrations() if migrations is None else migrations:
            names[physical_address(m.source_system, m.source_mailbox)] = m.address
            names[physical_address(m.target_system, mailbox_id_for(m.address))] = m.address
        if any(r.physical not in names for r in found):
            for address, physical in self.fed.directory().entries.items():
                names.setdefault(physical, address)
        return [(names.get(r.physical, r.physical), r) for r in found]

    def _record_refusals(self, now: datetime) -> None:
        """A `refused` event on each migration whose mailbox a system refuses (once per
        distinct reply), so that `reconcile events ADDRESS` shows it."""
        found = self.refusals()
        if not found:
            return
        with self.store.session() as session:
            for address, refusal in found:
                m = session.scalars(select(Migration).where(Migration.address == address)
                                    .order_by(Migration.id.desc())).first()
                if m is None:
                    continue
                last = session.scalars(select(Event).where(
                    Event.migration_id == m.id, Event.step == "refused")
                    .order_by(Event.id.desc())).first()
                if last is not None and json.loads(last.detail or "{}").get("reply") \
                        == refusal.reply:
                    continue
                log.warning("%s: %s refuses %s where fed routes its mail: %s", address,
                            refusal.system, refusal.physical, refusal.reply)
                record_event(session, m, "refused", from_state=m.state, to_state=m.state,
                             detail={"physical": refusal.physical, "system": refusal.system,
                                     "count": refusal.count, "since": refusal.first,
                                     "reply": refusal.reply},
                             commit=self.specs.commit, at=now)

    # -- apply ----------------------------------------------------------------------------
    def register_systems(self) -> None:
        """Tell fed where each system takes deliveries (idempotent, once per engine)."""
        if self._systems_registered:
            return
        for name, driver in self.drivers.items():
            endpoint = driver.delivery_endpoint()
            self.fed.put_system(name, endpoint.host, endpoint.port, endpoint.protocol,
                                tls=endpoint.tls, cafile=endpoint.cafile,
                                auth_user=endpoint.auth_user, auth_file=endpoint.auth_file,
                                rcpt=endpoint.rcpt)
        self._systems_registered = True

    def apply(self, *, max_passes: int = 100) -> ApplyReport:
        """Passes until one makes no progress (or `max_passes`): everything due now is done."""
        report = ApplyReport()
        if not self._register_or_fenced():
            return report
        passes = 0
        while passes < max_passes:
            if self.should_stop() or self.lease_lost is not None:
                break
            report.passes += 1
            passes += 1
            progressed = self.apply_pass(report)
            if not progressed:
                # With workers: what they still run is progress to come; wait for a result
                # (a pass that only turns results into transitions counts as no pass).
                if self.jobs is None or not self.jobs.wait(self.should_stop):
                    break
                passes -= 1
        return report

    def _register_or_fenced(self) -> bool:
        """register_systems(); False (and `lease_lost` set) when fed fenced us out."""
        try:
            self.register_systems()
        except LeaseLost as exc:
            self.lease_lost = exc
            return False
        return True

    def apply_pass(self, report: ApplyReport, *, chain: bool = True) -> bool:
        """One pass; True when at least one state changed. `chain=False`: no E9 right after
        E5-E8 (a test that looks at the held state between passes)."""
        now = self.clock()
        seen = self.observe()
        return self.run_changes(self.plan(now, observed=seen).due(), report, now, purge=True,
                                chain=chain, address_errors=frozenset(seen.address_errors))

    def apply_changes(self, changes: list[Change]) -> ApplyReport:
        """Run exactly `changes` (a reviewed, saved plan), once each, in one pass."""
        report = ApplyReport(passes=1)
        if not self._register_or_fenced():
            return report
        self.run_changes(changes, report, self.clock(), purge=False)
        return report

    def run_changes(self, changes: list[Change], report: ApplyReport, now: datetime, *,
                    purge: bool, chain: bool = False,
                    address_errors: frozenset[str] | None = None) -> bool:
        """Run `changes` in order, then the pass's up-syncs and down-sync; True on progress.

        `chain`: a mailbox whose hold just took effect (E5-E8) is flipped and released (E9)
        right away, before the next mailbox is held: each hold then lasts one E9, not the
        holds of every other mailbox of the wave plus their flips (a saved plan runs exactly
        its changes, without chaining). `address_errors`: the addresses with a create / E1
        error in the snapshot the changes were planned from (`PassCache.address_errors`)."""
        cache = PassCache(changed=set(self._upsync_pending),
                          downsync_needed=self._downsync_pending, address_errors=address_errors)
        progressed = self._run_queue(deque(changes), report, now, cache, chain=chain)
        if self.lease_lost is not None:
            return False
        if purge:
            # After the plan's changes: a record they just finished may be due at once.
            progressed = self._run_queue(deque(self._due_purges(now)), report, now, cache,
                                         chain=False) or progressed
            if self.lease_lost is not None:
                return False
            self._record_refusals(now)
        failed_syncs = self._sync(cache, now)
        for record in failed_syncs:
            self._report(report, record)
        # A failed closing sync ends apply: the next pass would see the same directory and
        # redo the same steps (a create looks for its address in fed's directory).
        return progressed and not failed_syncs

    def _run_queue(self, queue: deque[Change], report: ApplyReport, now: datetime,
                   cache: PassCache, *, chain: bool) -> bool:
        """Run the queued changes in order (until a stop); True when one succeeded."""
        progressed = False
        while queue:
            change = queue.popleft()
            if self.should_stop() or self.lease_lost is not None:
                break
            if change.step in _WAVE_STEPS:
                for done in self._run_wave(_take_wave(change, queue), now, cache, chain=chain):
                    self._report(report, done)
                    progressed = progressed or done.ok
                continue
            record = self._run_change(change, now, cache)
            if chain and record is not None and record.ok and change.step == "E5" \
                    and record.to_state == MigrationState.HELD:
                queue.appendleft(replace(change, step="E9", state=5))
            if record is None:
                continue
            self._report(report, record)
            progressed = progressed or record.ok
        return progressed

    def _report(self, report: ApplyReport, record: StepRecord) -> None:
        record.at = self.clock()
        report.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _sync(self, cache: PassCache, now: datetime) -> list[StepRecord]:
        """The pass's closing E6 up-syncs and down-sync. One that fails is reported and
        kept for the next pass (nothing else depends on it finishing now: E5 up-syncs for
        itself, and the down-sync is only the systems' copy of fed's address book)."""
        failed: list[StepRecord] = []
        self._upsync_pending = set()
        for system in sorted(cache.changed):
            try:
                with self.store.session() as session:
                    self._context(session, now, cache, "").upsync(system)
            except LeaseLost as exc:
                self.lease_lost = exc
                return failed
            except Exception as exc:
                self._upsync_pending.add(system)
                failed.append(StepRecord(f"system {system}", "E6", False, None,
                                         _error_text(exc, f"up-sync of {system}")))
        self._downsync_pending = False
        if cache.downsync_needed:
            try:
                self.downsync()
            except LeaseLost as exc:
                self.lease_lost = exc
            except Exception as exc:
                self._downsync_pending = True
                failed.append(StepRecord("every system", "down-sync", False, None,
                                         _error_text(exc, "down-sync")))
        return failed

    def _context(self, session: Session, now: datetime, cache: PassCache,
                 address: str) -> StepContext:
        return StepContext(specs=self.specs, fed=self.fed, drivers=self.drivers,
                           session=session, now=now, cache=cache, desired=self.desired.get(address),
                           progress=self.progress, jobs=self.jobs)

    def _run_change(self, change: Change, now: datetime, cache: PassCache) -> StepRecord | None:
        """One change through the step registry, in its own transaction: the step, then its
        new state and event; an error is recorded as the registry's limits say."""
        step = change.step or ""
        try:
            spec = step_for(change.step)
        except PermanentError as exc:  # a step the registry does not have: nothing is run
            self._fail(change, str(exc), step, now)
            return StepRecord(change.address, step, False, None, str(exc))
        try:
            with self.store.session() as session:
                ctx = self._context(session, now, cache, change.address)
                try:
                    outcome = spec.run(ctx, change)
                except NotReady:
                    # Not an error: the step may have asked a station for something, which
                    # commits with this session; the plan shows what it waits for.
                    return None
                if outcome is None:
                    return None  # someone else moved it since we planned
                _failpoint(step, "after-action")
                outcome.detail.update(self._config_changes())
                self._record(session, change, outcome, now)
            _failpoint(step, "after-commit")
            return StepRecord(change.address, outcome.label, True, outcome.to_state,
                              outcome.message)
        except Exception as exc:
            return self._error(change, spec, exc, now)

    def _error(self, change: Change, spec: StepSpec, exc: Exception,
               now: datetime) -> StepRecord | None:
        """Record a step's error as the registry's limits say; the record for apply (None
        for a manual step: the migration waits for a person, no error)."""
        step = change.step or ""
        if isinstance(exc, LeaseLost):
            # Not this migration's error: another reconciler acts now. Record nothing.
            self.lease_lost = exc
            return StepRecord(change.address, step, False, None, str(exc))
        if isinstance(exc, ManualStep) and self._manual(change, exc, now):
            return None  # not an error: the plan shows what the person must do
        if isinstance(exc, PermanentError):
            self._fail(change, str(exc), exc.step or step, now)
            return StepRecord(change.address, exc.step or step, False, None, str(exc))
        # TemporaryError and anything unexpected: retry, bounded
        bug = not isinstance(exc, StepError)
        if bug:
            log.error("unexpected error\n%s", "".join(traceback.format_exception(exc)))
        message = _error_text(exc, f"{change.address} {step}")
        delay = exc.delay if isinstance(exc, TemporaryError) else None
        frozen = self._backoff(change, spec, message, delay, bug, now,
                               counts=not isinstance(exc, Waiting))
        return StepRecord(change.address, step, False, None, frozen or message)

    # -- a wave's cutover: E5-E8 and E9 of many mailboxes, batched --------------------------

    def _run_wave(self, changes: list[Change], now: datetime, cache: PassCache, *,
                  chain: bool) -> list[StepRecord]:
        """The E5 and E9 changes of a pass together: one hold for every mailbox whose E5-E8
        checks pass, then (with `chain`, and for the mailboxes already held) one batch flip,
        the redirects and one release. Each mailbox keeps its own transition and event,
        committed together once fed has answered for the whole wave; a fed call that fails
        fails the wave's step for every mailbox in it (nothing recorded, retried as the
        registry says: E5 and E9 are never frozen by their errors)."""
        records: list[StepRecord] = []
        proved: set[int] = set()
        held = self._hold_wave([c for c in changes if c.step == "E5"], now, cache, records,
                               proved if chain else None)
        flips = [c for c in changes if c.step == "E9"]
        if chain:
            flips = [replace(c, step="E9", state=MigrationState.HELD) for c in held] + flips
        if flips and self.lease_lost is None and not self.should_stop():
            self._flip_wave(flips, now, cache, records, proved)
        return records

    def _wave_rows(self, session: Session, ctx: StepContext, changes: list[Change],
                   check: Callable[[StepContext, Migration], None],
                   errors: list[tuple[Change, Exception]]) -> list[tuple[Change, Migration]]:
        """The rows of `changes` still as planned whose per-mailbox `check` passes."""
        rows: list[tuple[Change, Migration]] = []
        for change in changes:
            m = current_row(session, change)
            if m is None:
                continue  # someone else moved it since we planned
            try:
                check(ctx, m)
            except Exception as exc:
                errors.append((change, exc))
                if isinstance(exc, LeaseLost):
                    break
                continue
            rows.append((change, m))
        return rows

    def _commit_wave(self, session: Session, rows: list[tuple[Change, Migration]],
                     outcomes: list[Outcome], now: datetime) -> None:
        """Each mailbox's transition and event, in the wave's one transaction."""
        changes = self._config_changes()
        for (change, m), outcome in zip(rows, outcomes, strict=True):
            outcome.migration = m
            outcome.detail.update(changes)
            self._record(session, change, outcome, now)

    def _wave_errors(self, step: str, errors: list[tuple[Change, Exception]],
                     now: datetime, records: list[StepRecord]) -> None:
        spec = step_for(step)
        for change, exc in errors:
            record = self._error(change, spec, exc, now)
            if record is not None:
                records.append(record)

    def _hold_wave(self, changes: list[Change], now: datetime, cache: PassCache,
                   records: list[StepRecord], proved: set[int] | None) -> list[Change]:
        """E5-E8 of a wave: the checks per mailbox, one hold; the changes now held.

        `proved` (when E9 follows in this pass): the ids of the migrations whose ADP2 their
        target took on a fresh session just before the hold (invariant 9's proof, made here
        so that it does not lengthen the hold: nothing of the wave changes a target's tables
        between this proof and the flip)."""
        if not changes:
            return []
        errors: list[tuple[Change, Exception]] = []
        rows: list[tuple[Change, Migration]] = []
        with self.store.session() as session:
            ctx = self._context(session, now, cache, "")
            rows = self._wave_rows(session, ctx, changes, cutover.e5_prepare, errors)
            if rows and self.lease_lost is None and not any(
                    isinstance(e, LeaseLost) for _, e in errors):
                try:
                    if proved is not None:
                        proved.update(m.id for m in cutover.prove_wave(ctx, [m for _, m in rows]))
                    held = cutover.hold_wave(ctx, [m for _, m in rows])
                except Exception as exc:
                    errors.extend((change, exc) for change, _ in rows)
                    rows = []
                else:
                    self._commit_wave(session, rows, [cutover.e5_held(m, held)
                                                      for _, m in rows], now)
                    _failpoint("E5", "after-action")
            else:
                rows = []
        if rows:
            _failpoint("E5", "after-commit")
        records.extend(StepRecord(change.address, "E5-E8", True, MigrationState.HELD, "")
                       for change, _ in rows)
        self._wave_errors("E5", errors, now, records)
        return [change for change, _ in rows]

    def _flip_wave(self, changes: list[Change], now: datetime, cache: PassCache,
                   records: list[StepRecord], proved: set[int]) -> None:
        """E9 of a wave: checks, the proofs (but for the migrations `proved` just before
        their hold), one batch flip (fed's transaction: all or nothing), the redirects, one
        release."""
        errors: list[tuple[Change, Exception]] = []
        rows: list[tuple[Change, Migration]] = []
        with self.store.session() as session:
            ctx = self._context(session, now, cache, "")
            rows = self._wave_rows(session, ctx, changes, cutover.e9_check, errors)
            if any(isinstance(e, LeaseLost) for _, e in errors):
                rows = []
            try:
                rows = self._flip_rows(ctx, rows, errors, proved)
                flipped = cutover.flip_wave(ctx, [m for _, m in rows]) if rows else []
            except PermanentError as exc:
                if isinstance(exc, LeaseLost) or len(rows) == 1:
                    raise  # pragma: no cover - LeaseLost is no PermanentError
                # fed refused the batch (an address at a third physical): nothing was
                # flipped; each mailbox on its own, so that only the refused one stops.
                flipped, rows = self._flip_each(ctx, rows, errors)
            except Exception as exc:
                errors.extend((change, exc) for change, _ in rows)
                rows = []
            if rows:
                try:
                    cutover.redirect_wave(ctx, [m for _, m in rows])
                    waiting, released = cutover.release_wave(ctx, [m for _, m in rows])
                    cutover.after_release(ctx, [m for _, m in rows])
                    outcomes = [cutover.e9_released(ctx, m, f, waiting, released)
                                for (_, m), f in zip(rows, flipped, strict=True)]
                except Exception as exc:
                    # Flipped but not released: still held (5); the retry's flip finds them
                    # flipped already and goes on from there.
                    errors.extend((change, exc) for change, _ in rows)
                    rows = []
                else:
                    self._commit_wave(session, rows, outcomes, now)
                    _failpoint("E9", "after-action")
        if rows:
            _failpoint("E9", "after-commit")
        records.extend(StepRecord(change.address, "E9", True, MigrationState.FLIPPED, "")
                       for change, _ in rows)
        self._wave_errors("E9", errors, now, records)

    def _flip_rows(self, ctx: StepContext, rows: list[tuple[Change, Migration]],
                   errors: list[tuple[Change, Exception]],
                   proved: set[int]) -> list[tuple[Change, Migration]]:
        """Invariant 9 for the wave: the rows whose target takes their ADP2 (probes of many
        addresses; those of a refused probe are proved one by one)."""
        ready = proved | {m.id for m in cutover.prove_wave(
            ctx, [m for _, m in rows if m.id not in proved])}
        kept: list[tuple[Change, Migration]] = []
        for change, m in rows:
            if m.id not in ready:
                try:
                    ctx.prove_delivery(m.target_system, new_physical(m), m, "E9")
                except TemporaryError as exc:
                    errors.append((change, exc))
                    continue
            kept.append((change, m))
        return kept

    def _flip_each(self, ctx: StepContext, rows: list[tuple[Change, Migration]],
                   errors: list[tuple[Change, Exception]]
                   ) -> tuple[list[FlipResult], list[tuple[Change, Migration]]]:
        flipped: list[FlipResult] = []
        kept: list[tuple[Change, Migration]] = []
        for change, m in rows:
            try:
                flipped.extend(cutover.flip_wave(ctx, [m]))
            except Exception as exc:
                errors.append((change, exc))
                continue
            kept.append((change, m))
        return flipped, kept

    def _config_changes(self) -> dict[str, dict[str, list[str]]]:
        """{"config_changes": {system: [diff, ...]}} when a driver changed a system's own
        configuration during the step (recorded in its event for the admin), else {}."""
        changes = {name: found for name, driver in sorted(self.drivers.items())
                   if (found := driver.take_config_changes())}
        return {"config_changes": changes} if changes else {}

    def _record(self, session: Session, change: Change, outcome: Outcome,
                now: datetime) -> None:
        m = outcome.migration
        if m is None or not _own(change):
            # create, E1: the address had no migration (E1's event is the new row's first).
            record_event(session, m, outcome.label, address=change.address,
                         to_state=outcome.to_state, detail=outcome.detail,
                         commit=self.specs.commit, at=now)
            return
        m.manual_step = None  # whatever a person had to do is done: the step ran
        if outcome.to_state == m.state:
            # An arrow back to the same state (E43 at 13): the state's time stays.
            m.attempts, m.error_since, m.last_error, m.next_attempt_at = 0, None, None, None
            record_event(session, m, outcome.label, from_state=m.state, to_state=m.state,
                         detail=outcome.detail, commit=self.specs.commit, at=now)
            return
        if outcome.to_state is None:
            # The step succeeded without a transition: its run of errors is over.
            m.attempts, m.error_since, m.last_error, m.next_attempt_at = 0, None, None, None
            record_event(session, m, outcome.label, detail=outcome.detail,
                         commit=self.specs.commit, at=now)
            return
        record_transition(session, m, outcome.label, outcome.to_state,
                          detail=outcome.detail, commit=self.specs.commit, at=now)

    def _manual(self, change: Change, exc: ManualStep, now: datetime) -> bool:
        """A migration waits for a person (`Migration.manual_step`): its state is kept, the
        step is rechecked after `exc.delay`, an event is recorded when the task is new.
        Never exhausted like an error. A change without a migration row (a create) keeps it
        in its address_errors row. False when the migration row is gone."""
        with self.store.session() as session:
            if not _own(change):
                error = session.get(AddressError, change.address)
                if error is None or error.manual_step != exc.task:
                    record_event(session, None, "manual", address=change.address,
                                 detail={"step": change.step, "task": exc.task,
                                         "why": exc.why}, commit=self.specs.commit, at=now)
                error = error or AddressError(address=change.address, error_since=now)
                error.step, error.attempts, error.last_error = change.step or "", 0, exc.why
                error.manual_step, error.failed_reason = exc.task, None
                error.next_attempt_at = now + timedelta(seconds=exc.delay)
                session.add(error)
                return True
            m = session.get(Migration, change.migration_id)
            if m is None:
                return False
            if m.manual_step != exc.task:
                record_event(session, m, "manual", from_state=m.state, to_state=m.state,
                             detail={"step": change.step, "task": exc.task, "why": exc.why},
                             commit=self.specs.commit, at=now)
            m.manual_step = exc.task
            m.last_error = exc.why or None
            m.next_attempt_at = now + timedelta(seconds=exc.delay)
            m.attempts, m.error_since = 0, None
        return True

    def _fail(self, change: Change, reason: str, step: str, now: datetime) -> None:
        """Freeze: the migration (or, for a create / E1, the address) with its reason."""
        with self.store.session() as session:
            m = session.get(Migration, change.migration_id) if _own(change) else None
            if m is None:
                error = session.get(AddressError, change.address) or AddressError(
                    address=change.address, step=step, attempts=0, error_since=now,
                    last_error=reason)
                error.step, error.failed_reason, error.next_attempt_at = step, reason, None
                session.add(error)
                record_event(session, None, "failed", address=change.address,
                             detail={"step": step, "reason": reason},
                             commit=self.specs.commit, at=now)
                return
            m.failed_reason = reason
            m.failed_step = step
            m.next_attempt_at = None
            m.manual_step = None
            record_event(session, m, "failed", from_state=m.state, to_state=None,
                         detail={"step": m.failed_step, "reason": reason},
                         commit=self.specs.commit, at=now)

    def _backoff(self, change: Change, spec: StepSpec, message: str, delay: float | None,
                 bug: bool, now: datetime, *, counts: bool = True) -> str | None:
        """Count one more error; the back-off, or the frozen reason once the step's limits
        are spent (returned, and recorded like a PermanentError). A wait the specs ask for
        (`Waiting`, `counts=False`) is recorded the same way but counts against nothing:
        retried after exactly its delay."""
        with self.store.session() as session:
            m = session.get(Migration, change.migration_id) if _own(change) else None
            row: Migration | AddressError
            if m is not None:
                row = m
            else:
                row = session.get(AddressError, change.address) or AddressError(
                    address=change.address, step=spec.name, attempts=0, error_since=now,
                    last_error="")
                session.add(row)
            if counts:
                row.attempts = (row.attempts or 0) + 1
                if row.error_since is None:
                    row.error_since = now
            why = spec.exhausted(row.attempts or 0, (now - row.error_since).total_seconds()
                                 if row.error_since is not None else 0.0, bug=bug) \
                if counts else None
            if why is None:
                wait = spec.delay(row.attempts, delay) if counts else float(delay or 0.0)
                row.next_attempt_at = now + timedelta(seconds=wait)
                if row.last_error != message:  # one event per distinct error, not per retry
                    record_event(session, m, "error", address=change.address,
                                 from_state=change.state, to_state=change.state,
                                 detail={"step": spec.name, "error": message,
                                         "retry_in_s": wait, **self._config_changes()},
                                 commit=self.specs.commit, at=now)
                row.last_error = message
                return None
        reason = f"{message} ({why})"
        self._fail(change, reason, spec.name, now)
        return reason

    def _due_purges(self, now: datetime) -> list[Change]:
        """E43 for every record at 13 past its retention (not failed, not backing off): the
        plan leaves finished records in sync, the engine finds this housekeeping due."""
        with self.store.session() as session:
            found = session.scalars(select(Migration).where(
                Migration.state == MigrationState.SOURCE_DELETED, Migration.purged.is_(False),
                Migration.failed_reason.is_(None)).order_by(Migration.id))
            return [Change(address=m.address, action="step", source=m.source_system,
                           target=m.target_system, state=m.state, step="E43", due=now,
                           migration_id=m.id, placement=m.placement)
                    for m in found if purge_due(view(m), now)
                    and (m.next_attempt_at is None or m.next_attempt_at <= now)]

    def downsync(self) -> None:
        """Down-sync: every system's address book gets fed's merged directory."""
        entries = self.fed.downsync().entries
        for driver in self.drivers.values():
            driver.apply_address_book(entries)


_WAVE_STEPS = ("E5", "E9")


def _take_wave(first: Change, queue: deque[Change]) -> list[Change]:
    """`first` and the queue's other E5 and E9 changes (a wave of at most `cutover.WAVE`),
    taken out of the queue, which keeps the rest in order."""
    wave, rest = [first], list[Change]()
    for change in queue:
        (wave if change.step in _WAVE_STEPS and len(wave) < cutover.WAVE else rest).append(change)
    queue.clear()
    queue.extend(rest)
    return wave


def _error_text(exc: BaseException, where: str) -> str:
    """A mailferry error's own text (it names its address and step), or, for anything
    else, `where: unexpected TypeError: ...`."""
    if isinstance(exc, StepError):
        return str(exc)
    return f"{where}: unexpected {type(exc).__name__}: {exc}"
