"""The state store's tables (patent: the migration control server's database MDB).

- `migrations`: one row per migration request MR: address, source and target, window,
  modes, the patent state 0-13 (or failed, with the reason), the address-migration id
  recorded at E9. At most one *active* (not purged) migration per address.
- `events`: append-only; one row per transition, written in the same transaction as the
  state change, with the specs' git commit (invariant 4).
- `station_reports`: what station agents said (checks, local data, switch, test, cleanup).
- `stations`: enrolled stations with their token hash (never the token).
- `transfer_manifest`: what the data mover copied, per mailbox and folder.
- `transfer_runs`: the data mover's figures per pass, for the plan's estimates.
- `leases`: who may act (one reconciler at a time; `reconciler.lease`), with the fencing
  token every mutating call to fed carries.
- `address_errors`: back-off and failure of a `create` or `E1` (no migration row yet).
- `placement_suspensions`: placements an admin suspended (`reconcile suspend`).
- `wave_reports`: the reports written when a placement finished (`reconciler.report`).
- `data_jobs`, `data_workers`, `system_pace`: the data steps handed to `reconcile worker`
  processes, those workers, and the pace every worker shares (`reconciler.workers`).

Schema changes go through Alembic (`reconciler/state/alembic/versions`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    cast,
    type_coerce,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from reconciler.spec.modes import Modes, modes_from_text


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class ModesJSON(TypeDecorator[Modes]):
    """A migration's modes: typed in Python, the same JSON object in the column as ever
    (`Modes.to_json`; old rows read through `Modes.from_json`, no data migration)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Modes | None, dialect: Any) -> dict[str, Any] | None:
        return None if value is None else value.to_json()

    def process_result_value(self, value: Any, dialect: Any) -> Modes:
        return Modes.from_json(value)


class _ModesText(TypeDecorator[Modes]):
    """The modes column read as its JSON text, one shared `Modes` per distinct text."""

    impl = Text
    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Any) -> Modes:
        return modes_from_text(value)


class Base(DeclarativeBase):
    pass


STATE_FAILED = -1  # the `state` column keeps the last good state; `failed_reason` marks failure


class Migration(Base):
    __tablename__ = "migrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    source_system: Mapped[str] = mapped_column(String(64))
    target_system: Mapped[str] = mapped_column(String(64))
    source_mailbox: Mapped[str] = mapped_column(String(320))
    target_mailbox: Mapped[str] = mapped_column(String(320))
    placement: Mapped[str] = mapped_column(String(128))
    window: Mapped[str | None] = mapped_column(String(128), nullable=True)
    modes: Mapped[Modes] = mapped_column(ModesJSON, default=Modes())
    station: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state: Mapped[int] = mapped_column(Integer, default=0)
    state_since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    failed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    failed_step: Mapped[str | None] = mapped_column(String(16), nullable=True)
    address_migration_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hold_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the current run of errors of this state's step began (its retry timeout counts
    # from here); None while the step has not failed since the state was entered.
    error_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    mailbox_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mailbox_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What the station agent must do next (set by the engine, served by the station API):
    # None | "check1" | "check2" | "local-migrate"
    station_action: Mapped[str | None] = mapped_column(String(32), nullable=True)
    station_action_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    suspended: Mapped[bool] = mapped_column(Boolean, default=False)
    purged: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A step mailferry cannot do itself and waits for a person to do (E2 on a hosted
    # target: "provision jane@corp.example on hosted365"); None when nothing is asked.
    # Set by the engine from a ManualStep, cleared when the step succeeds.
    manual_step: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def failed(self) -> bool:
        return self.failed_reason is not None


def shared_modes() -> ColumnElement[Modes]:
    """`Migration.modes` for reading many rows (a plan's snapshot): the column's text,
    parsed once per distinct text rather than once per row -- the rows of one policy
    share one frozen `Modes` (at 100,000 rows: no dict tree per row to decode and keep)."""
    return type_coerce(cast(Migration.modes, Text), _ModesText()).label("modes")


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    migration_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    step: Mapped[str] = mapped_column(String(16))
    from_state: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_state: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    specs_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Station(Base):
    __tablename__ = "stations"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class StationReport(Base):
    __tablename__ = "station_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    station: Mapped[str] = mapped_column(String(128), index=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    migration_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    # check1 | check2 | local-data | switch | test | rollback | cleanup | done | failed
    kind: Mapped[str] = mapped_column(String(32))
    ok: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TransferManifest(Base):
    __tablename__ = "transfer_manifest"
    __table_args__ = (Index("ix_manifest_migration_folder", "migration_id", "folder"),
                      Index("ix_manifest_mailbox_folder", "mailbox", "folder"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    migration_id: Mapped[int] = mapped_column(Integer)
    folder: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    message_id: Mapped[str | None] = mapped_column(String(998), nullable=True)
    copied: Mapped[bool] = mapped_column(Boolean)  # False: was already present in the target
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Added by revision 0004 (the mover's manifest): the copy job, and UID caches that are
    # trusted only under the same UIDVALIDITY on each side.
    mailbox: Mapped[str | None] = mapped_column(String(320), nullable=True)
    src_validity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    src_uid: Mapped[str | None] = mapped_column(String(255), nullable=True)
    dst_folder: Mapped[str | None] = mapped_column(String(512), nullable=True)
    dst_validity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dst_uid: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Added by revision 0005 (proof from the target's own bytes): the hash of what the target
    # returned for dst_uid, what that proved (identical | equivalent:REWRITE | altered:KIND)
    # and, for an alteration, an example of the change. NULL: never read back.
    dst_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    proof: Mapped[str | None] = mapped_column(String(64), nullable=True)
    proof_note: Mapped[str | None] = mapped_column(String(512), nullable=True)


class TransferRun(Base):
    """One data mover pass over a mailbox: its figures feed the plan's time estimates."""

    __tablename__ = "transfer_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    migration_id: Mapped[int] = mapped_column(Integer, index=True)
    copied: Mapped[int] = mapped_column(Integer, default=0)
    present: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_copied: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Added by revision 0004: which job and phase (prestage | copy | final), source totals
    # (for --plan's estimates), messages found missing, and the per-folder report (JSON).
    mailbox: Mapped[str | None] = mapped_column(String(320), nullable=True)
    phase: Mapped[str | None] = mapped_column(String(16), nullable=True)
    messages_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    missing: Mapped[int | None] = mapped_column(Integer, nullable=True)
    report: Mapped[str | None] = mapped_column(Text, nullable=True)


class Lease(Base):
    """Who may act: one row per lease name, taken and renewed with compare-and-set updates."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The fencing token: +1 on every acquisition, never reused (a released lease keeps its
    # row). fed refuses a mutating call carrying a lower one (docs/fed-api.md, fencing).
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    # Names this lease to fed (one fed may serve several state stores): random, set once.
    fence_id: Mapped[str] = mapped_column(String(64), default="")


class AddressError(Base):
    """The errors of a change that has no migration row yet (`create`, `E1`): its back-off,
    and once its retries are spent its permanent failure (`reconcile retry` clears it)."""

    __tablename__ = "address_errors"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    step: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_since: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    failed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    manual_step: Mapped[str | None] = mapped_column(Text, nullable=True)  # as a migration's


class PlacementSuspension(Base):
    """A placement an admin suspended: none of its mailboxes takes a step until resumed."""

    __tablename__ = "placement_suspensions"

    placement: Mapped[str] = mapped_column(String(128), primary_key=True)
    since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    by: Mapped[str] = mapped_column(String(255), default="")
    reason: Mapped[str] = mapped_column(Text, default="")


class WaveReport(Base):
    """A wave report written when a placement finished (once per set of migrations)."""

    __tablename__ = "wave_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    placement: Mapped[str] = mapped_column(String(128), index=True)
    last_migration_id: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    mailed_to: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DataJob(Base):
    """A data step handed to the workers (`reconcile worker`, `reconciler.workers`): one row
    per migration, step and the state it was queued in. The reconciler queues it, a worker
    marks it running and writes its result here; the reconciler's next pass turns a result
    into the transition (with its event, in one transaction) and deletes the row."""

    __tablename__ = "data_jobs"
    __table_args__ = (Index("ux_data_jobs_step", "migration_id", "step", "state", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    migration_id: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(16))
    state: Mapped[int] = mapped_column(Integer)
    address: Mapped[str] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16))  # queued | running | done | error
    job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # procrastinate's
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # workers that started it
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # done: {"detail": {...}}; error: {"kind": "temporary"|"permanent", "message", "delay"}
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class DataWorker(Base):
    """A `reconcile worker` process, as the status page and `reconcile status` name it: the
    worker writes its row when it starts, `last_seen` every heartbeat, and deletes it when it
    stops; a row whose `last_seen` is older than its `stalled` is a worker that died (its
    jobs go to another worker). procrastinate's own `procrastinate_workers` has no names."""

    __tablename__ = "data_workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # data_jobs.worker
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    heartbeat: Mapped[float] = mapped_column(Float)  # seconds between two `last_seen`
    stalled: Mapped[float] = mapped_column(Float)  # seconds without one: the lease expired
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)


class SystemPace(Base):
    """A mail system's pace shared by every worker (`reconciler.workers.fleet`): the next
    instant a message may go (GCRA's theoretical arrival time) and the back-off after the
    system's throttling answers."""

    __tablename__ = "system_pace"

    system: Mapped[str] = mapped_column(String(128), primary_key=True)
    tat: Mapped[datetime] = mapped_column(UTCDateTime)
    strikes: Mapped[int] = mapped_column(Integer, default=0)
    struck_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
