"""The manifest: what the mover knows it copied, per mailbox, in the state store.

Why content and not UIDs: the manifest says "source folder F holds a message whose wire
bytes hash to H (size S, Message-ID M), and the target holds it as UID U". The key is
(folder, H); UIDs are only a *cache* trusted under the UIDVALIDITY they were recorded with,
on each side. So:

- a re-run lists both sides (metadata only), finds every UID in the cache, and knows
  without reading a single body that nothing is missing: that is what makes the final
  delta after the cutover as fast as the delta is small;
- after a source UIDVALIDITY reset the cached source UIDs are ignored, the source bodies are
  read and hashed once more, and they are found in the target by hash: nothing is copied
  twice;
- a crash between an APPEND and the manifest write leaves a target message the manifest
  does not know: the next run hashes the target messages that could be it (same size and
  Message-ID) before deciding, so it is not appended a second time;
- messages without a Message-ID, or two different messages sharing one, are told apart by
  their hash.

Rows are appended in batches (one transaction per flush) and never updated: a later row
for the same source message under a new validity simply supersedes the old one in the
cache. `transfer_runs` keeps each pass's figures for the report and the plan's estimates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from reconciler.state.lite import MANIFEST_READ, LiteStore

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.orm import Session

    from reconciler.state.store import Store

# SQLAlchemy and the state model are imported when first needed, not with this module: a
# `mover copy` in a new process that finds nothing changed never needs them (0.23 s of
# its start, issue 22; `reconciler.state.lite`). The mover's statements are Core ones on
# the tables themselves: the first ORM statement of a process configures every mapper
# (0.1-0.15 s, most of a no-op re-run's own work in a new process).


def _tables() -> tuple[Table, Table]:
    """The manifest's and the runs' tables."""
    from reconciler.state.model import TransferManifest, TransferRun
    return TransferManifest.__table__, TransferRun.__table__  # type: ignore[return-value]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ManifestRow:
    """One message known to be in the target."""

    folder: str  # canonical source folder
    sha256: str
    size: int
    message_id: str
    copied: bool  # False: found already present
    src_validity: str
    src_uid: str
    dst_folder: str
    dst_validity: str | None
    dst_uid: str | None
    # The proof from the target's own bytes (revision 0005): the hash of what the target
    # returned for dst_uid, and what it showed ("identical", "equivalent:REWRITE",
    # "altered:KIND"), with an example of an alteration. None: never read back, not a proof.
    dst_sha256: str | None = None
    proof: str | None = None
    proof_note: str = ""


@dataclass(frozen=True)
class RunFigures:
    """One pass over one mailbox."""

    mailbox: str
    phase: str
    copied: int
    present: int
    failed: int
    missing: int
    bytes_copied: int
    messages_total: int
    bytes_total: int
    seconds: float
    verified: bool
    report: dict[str, Any]


# What a run's report says its "verified" rests on: every copy read back from the target
# and hashed (revision 0005). A verified run without it (sizes trusted) proves nothing now.
PROOF = "target-bytes"

Sessions = Callable[[], AbstractContextManager["Session"]]


class Manifest:
    """The manifest rows and run figures of the jobs of one migration (or of stand-alone
    jobs, migration id 0), in a state store.

    `Manifest(store)` commits each flush in its own transaction (the CLI: a kill -9 loses at
    most the last unflushed batch); `Manifest.in_session(session)` writes into a step's
    transaction, committed with the step's event (the engine)."""

    def __init__(self, store: Store | Sessions, migration_id: int = 0) -> None:
        self.sessions: Sessions = store if callable(store) else store.session
        self.migration_id = migration_id
        self.lite: LiteStore | None = None  # `at_url`: every read and write through sqlite3
        self._store: Store | None = None  # what `close` closes (`at_url` on PostgreSQL)

    @classmethod
    def at_url(cls, url: str, migration_id: int = 0) -> Manifest:
        """The manifest of the store at `url`, for a process of its own (the CLI); `close`
        it at the end.

        The store is opened now (created or upgraded by `open_store` when it is new or
        older: a store that cannot be opened fails the copy before one message is copied).
        A SQLite file at the head revision is then read and appended through `LiteStore`
        (sqlite3): an existing one without importing SQLAlchemy at all, so a pass that
        finds nothing changed does not pay for it (0.23 s of its start), and no copy pays
        SQLAlchemy's statement machinery per manifest row. PostgreSQL: through SQLAlchemy."""
        lite = LiteStore.open(url) or LiteStore.create(url)
        if lite is None:
            from reconciler.state.store import open_store
            store = open_store(url)
            lite = LiteStore.open(url)
            if lite is None:
                manifest = cls(store, migration_id)
                manifest._store = store
                return manifest
            store.close()
        manifest = cls(_no_sessions, migration_id)
        manifest.lite = lite
        return manifest

    def close(self) -> None:
        """Close what `at_url` opened."""
        if self.lite is not None:
            self.lite.close()
        if self._store is not None:
            self._store.close()

    @classmethod
    def in_session(cls, session: Session, migration_id: int = 0) -> Manifest:
        """A manifest writing into an open session (flushed, not committed)."""
        @contextmanager
        def same() -> Iterator[Session]:
            yield session
            session.flush()
        return cls(same, migration_id)

    def load(self, mailbox: str, folder: str) -> list[ManifestRow]:
        """Every row of a source folder of a job, in this migration only: the same address
        moved back (A -> B -> A) is a new migration whose source is another server, where
        the same folder may carry the same UIDVALIDITY (Dovecot's is a creation time in
        seconds) over other messages."""
        rows = self.lite.manifest_rows(self.migration_id, mailbox, folder) \
            if self.lite is not None else self._manifest_rows(mailbox, folder)
        return [ManifestRow(r[0], r[1], r[2], r[3] or "", bool(r[4]), r[5] or "", r[6] or "",
                            r[7] or r[0], r[8], r[9], r[10], r[11], r[12] or "")
                for r in rows]

    def _manifest_rows(self, mailbox: str, folder: str) -> Sequence[Sequence[Any]]:
        from sqlalchemy import select
        with self.sessions() as session:
            m = _tables()[0].c
            return session.execute(
                select(*(m[c] for c in MANIFEST_READ))
                .where(m.migration_id == self.migration_id, m.mailbox == mailbox,
                       m.folder == folder)
                .order_by(m.id)).all()

    def add(self, mailbox: str, rows: Iterable[ManifestRow], at: datetime | None = None) -> int:
        """Append rows in one transaction; return how many."""
        now = at or _utcnow()
        # Core executemany, not ORM objects: ten times cheaper for thousands of rows.
        batch = [dict(
            migration_id=self.migration_id, mailbox=mailbox, folder=r.folder, sha256=r.sha256,
            size=r.size, message_id=r.message_id[:998] or None, copied=r.copied, at=now,
            src_validity=r.src_validity, src_uid=r.src_uid, dst_folder=r.dst_folder,
            dst_validity=r.dst_validity, dst_uid=r.dst_uid, dst_sha256=r.dst_sha256,
            proof=r.proof, proof_note=r.proof_note[:512] or None) for r in rows]
        if batch and self.lite is not None:
            self.lite.insert_manifest(batch, now)
        elif batch:
            from sqlalchemy import insert
            with self.sessions() as session:
                session.execute(insert(_tables()[0]), batch)
        return len(batch)

    def record_run(self, figures: RunFigures, at: datetime | None = None) -> None:
        """Keep one pass's figures."""
        self.record_runs([figures], at)

    def record_runs(self, runs: Iterable[RunFigures], at: datetime | None = None) -> None:
        """Keep several passes' figures in one transaction (one commit, one fsync)."""
        now = at or _utcnow()
        batch = [dict(
            migration_id=self.migration_id, mailbox=f.mailbox, phase=f.phase,
            copied=f.copied, present=f.present, failed=f.failed, missing=f.missing,
            bytes_copied=f.bytes_copied, messages_total=f.messages_total,
            bytes_total=f.bytes_total, seconds=f.seconds, verified=f.verified,
            report=json.dumps(f.report, sort_keys=True)) for f in runs]
        if batch and self.lite is not None:
            self.lite.insert_runs(batch, now)
        elif batch:
            from sqlalchemy import insert
            with self.sessions() as session:
                session.execute(insert(_tables()[1]), [dict(b, at=now) for b in batch])

    def last_states(self, mailbox: str) -> dict[str, tuple[str, str, str, int]]:
        """Per source folder of the last verified pass of a job: (source state, target
        folder, target state, messages), states as "UIDVALIDITY/UIDNEXT/MESSAGES"."""
        text = self.lite.last_verified_report(self.migration_id, mailbox) if self.lite is not None \
            else self._last_verified_report(mailbox)
        if not text:
            return {}
        report = json.loads(text)
        if report.get("proof") != PROOF:
            return {}  # verified before proofs came from the target's bytes: list again
        result = {}
        for f in report.get("folders", []):
            if f.get("src_state") and f.get("dst_state"):
                result[f["folder"]] = (f["src_state"], f["target"], f["dst_state"],
                                       int(f.get("messages", 0)))
        return result

    def _last_verified_report(self, mailbox: str) -> str | None:
        from sqlalchemy import select
        with self.sessions() as session:
            r = _tables()[1].c
            return cast(str | None, session.execute(
                select(r.report).where(r.migration_id == self.migration_id, r.mailbox == mailbox,
                                       r.verified.is_(True))
                .order_by(r.id.desc()).limit(1)).scalar())

    def copied_count(self, mailbox: str) -> int:
        """How many rows say 'copied by us' for a job (tests and reports)."""
        if self.lite is not None:
            return self.lite.copied_count(self.migration_id, mailbox)
        from sqlalchemy import func, select

        from reconciler.state.model import TransferManifest
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(TransferManifest).where(
                TransferManifest.migration_id == self.migration_id,
                TransferManifest.mailbox == mailbox, TransferManifest.copied.is_(True))) or 0)


@contextmanager
def _no_sessions() -> Iterator[Session]:
    raise RuntimeError("a manifest at a SQLite URL is read and written through sqlite3")
    yield  # pragma: no cover


RECENT_RUNS = 500  # the passes the throughput is measured over: this installation, lately


def throughput(session: Session, recent: int = RECENT_RUNS) -> tuple[float, float] | None:
    """(bytes/s, messages/s) over the `recent` latest passes that copied something, or None:
    what `--plan` uses to estimate how long a window's transfers will take. Rates are per
    mailbox copy (a pass's seconds are its own wall time), so copies running side by side
    make the estimate pessimistic, never optimistic."""
    from sqlalchemy import func, select

    from reconciler.state.model import TransferRun
    runs = (select(TransferRun.bytes_copied, TransferRun.copied, TransferRun.seconds)
            .where(TransferRun.copied > 0, TransferRun.seconds > 0)
            .order_by(TransferRun.id.desc()).limit(recent).subquery())
    row = session.execute(select(func.sum(runs.c.bytes_copied), func.sum(runs.c.copied),
                                 func.sum(runs.c.seconds))).one()
    total_bytes, total_msgs, seconds = row
    if not seconds:
        return None
    return float(total_bytes or 0) / float(seconds), float(total_msgs or 0) / float(seconds)


def seconds_for(rates: tuple[float, float], messages: float, size: float) -> float:
    """PURE: how long `messages` totalling `size` bytes take at (bytes/s, messages/s): the
    slower of the two (many small messages are bound by round trips, big ones by bytes)."""
    bps, mps = rates
    return max(size / bps if bps > 0 else 0.0, messages / mps if mps > 0 else 0.0)


def estimate_seconds(session: Session, messages: int, size: int) -> float | None:
    """How long copying `messages` totalling `size` bytes should take at the recorded
    throughput (the slower of the byte and message rates), or None without history."""
    rates = throughput(session)
    return None if rates is None else seconds_for(rates, messages, size)
