"""The mover in the reconciler's steps: E15 with its manifest, E41 refused while one is missing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import select

from reconciler.drivers.maildir import MaildirDriver
from reconciler.errors import TemporaryError, Waiting
from reconciler.mover.pace import LocalPace
from reconciler.mover.service import options_from_modes, pace_for
from reconciler.spec.model import DesiredMailbox, PolicySpec
from reconciler.spec.modes import Modes
from reconciler.state.model import Migration, TransferManifest, TransferRun
from reconciler.state.store import Store, default_url
from reconciler.steps.base import PassCache, StepContext
from reconciler.steps.cleanup import e41_delete_source
from reconciler.steps.transfer import e15_copy_mail

BOX = "jean=corp.example"


class Refusing(MaildirDriver):
    """A target that refuses to store any message containing b'poison'."""

    refuse = True

    def append_message(self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
                       internal_date: float | None = None) -> str:
        if self.refuse and b"poison" in data:
            raise OSError("quota exceeded")
        return super().append_message(mailbox_id, folder, data, flags=flags,
                                      internal_date=internal_date)


def setup(tmp_path: Path) -> tuple[Store, MaildirDriver, Refusing]:
    s1 = MaildirDriver("s1", tmp_path / "s1", ("127.0.0.1", 1), ("127.0.0.1", 2), "s1.internal")
    s2 = Refusing("s2", tmp_path / "s2", ("127.0.0.1", 3), ("127.0.0.1", 4), "s2.internal")
    s1.create_mailbox(BOX)
    s2.create_mailbox(BOX)
    for n in range(5):
        s1.append_message(BOX, "INBOX" if n % 2 else "Sent",
                          f"From: a@x\r\nMessage-ID: <{n}@x>\r\n\r\nbody {n}\r\n".encode(),
                          flags="S", internal_date=1_600_000_000 + n)
    return Store(default_url(tmp_path / "state.db")), s1, s2


def run(store: Store, drivers: dict[str, Any], step: Any) -> Any:
    with store.session() as session:
        m = session.scalars(select(Migration)).first()
        if m is None:
            m = Migration(address="jean@corp.example", source_system="s1", target_system="s2",
                          source_mailbox=BOX, target_mailbox=BOX, placement="p", state=10,
                          modes=Modes(data_transfer="copy", diary=True))
            session.add(m)
            session.flush()
        desired = DesiredMailbox("jean@corp.example", (), "s2", "p", None,
                                 PolicySpec("p", delete_consent=True), None)
        ctx = StepContext(specs=cast(Any, None), fed=cast(Any, None), drivers=drivers,
                          session=session, now=datetime.now(UTC), cache=PassCache(),
                          desired=desired)
        return step(ctx, m)


def test_e15_records_manifest_and_rerun_copies_nothing(tmp_path: Path) -> None:
    store, s1, s2 = setup(tmp_path)
    out = run(store, {"s1": s1, "s2": s2}, e15_copy_mail)
    assert out.to_state == 8 and out.detail["copied"] == 5 and out.detail["verified"]
    again = run(store, {"s1": s1, "s2": s2}, e15_copy_mail)
    assert (again.detail["copied"], again.detail["present"]) == (0, 5)
    with store.session() as session:
        rows = session.scalars(select(TransferManifest)).all()
        assert len(rows) == 5 and {r.mailbox for r in rows} == {"jean@corp.example"}
        assert [r.copied for r in session.scalars(select(TransferRun))] == [5, 0]


def test_e41_refuses_deletion_while_one_message_is_missing(tmp_path: Path) -> None:
    store, s1, s2 = setup(tmp_path)
    drivers = {"s1": s1, "s2": s2}
    run(store, drivers, e15_copy_mail)
    s1.append_message(BOX, "INBOX", b"From: a@x\r\nSubject: poison\r\n\r\nlate\r\n")
    with pytest.raises(TemporaryError, match="refusing to delete BOX1: 1 of its messages"):
        run(store, drivers, e41_delete_source)
    assert s1.get_account(BOX) is not None  # nothing deleted
    s2.refuse = False  # the admin raised the quota
    out = run(store, drivers, e41_delete_source)
    assert out.to_state == 13 and out.detail["last_delta_copied"] == 1
    assert s1.get_account(BOX) is None


def test_prestage_moves_the_bulk_then_e15_copies_only_the_delta(tmp_path: Path) -> None:
    from reconciler.mover.prestage import prestage
    from reconciler.state.model import Event

    store, s1, s2 = setup(tmp_path)
    with store.session() as session:
        session.add(Migration(address="jean@corp.example", source_system="s1",
                              target_system="s2", source_mailbox=BOX, target_mailbox=BOX,
                              placement="p", state=1,
                              modes=Modes(data_transfer="copy", prestage_copy=True)))
    drivers: dict[str, Any] = {"s1": s1, "s2": s2}
    reports = prestage(store, drivers)
    assert [(r.copied, r.verified) for r in reports] == [(5, True)]
    with store.session() as session:
        m = session.scalars(select(Migration)).one()
        assert m.state == 1  # prestage never changes the state
        assert [e.step for e in session.scalars(select(Event))] == ["PRESTAGE"]
    s1.append_message(BOX, "INBOX", b"From: a@x\r\nMessage-ID: <late@x>\r\n\r\nlate\r\n")
    out = run(store, drivers, e15_copy_mail)
    assert (out.detail["copied"], out.detail["present"]) == (1, 5)
    with store.session() as session:
        phases = [r.phase for r in session.scalars(select(TransferRun))]
        assert phases == ["prestage", "copy"]


def test_e15_waits_for_the_next_days_budget_of_a_system(tmp_path: Path) -> None:
    """A policy's `systemLimits` gives the target 100 bytes a day: E15 copies what fits,
    then waits (`Waiting`, until the next UTC midnight, its reason naming the system); on
    the next day (the system's pace given a later clock) it copies more, never twice."""
    store, s1, s2 = setup(tmp_path)
    modes = Modes(data_transfer="copy", diary=False, system_limits=(("s2", 0, 0, 100),))
    with store.session() as session:
        session.add(Migration(address="jean@corp.example", source_system="s1",
                              target_system="s2", source_mailbox=BOX, target_mailbox=BOX,
                              placement="p", state=10, modes=modes))
    day = [datetime(2026, 12, 4, 18, 0, tzinfo=UTC)]
    pace = pace_for("s2", modes)
    assert isinstance(pace, LocalPace)  # this process's (no fleet here)
    pace.clock = lambda: day[0]
    drivers = {"s1": s1, "s2": s2}
    with pytest.raises(Waiting) as caught:
        run(store, drivers, e15_copy_mail)
    assert "waiting: daily budget of system s2 spent" in str(caught.value)
    assert "resumes at 2026-12-05 00:00 UTC" in str(caught.value)
    first = sum(len(s2.list_messages(BOX, f)) for f in s2.list_folders(BOX))
    assert 0 < first < 5
    out = None
    for _ in range(6):  # bounded: a message or two a day
        day[0] += timedelta(days=1)
        try:
            out = run(store, drivers, e15_copy_mail)
            break
        except Waiting:
            continue
    assert out is not None and out.detail["verified"]
    ids = [m.message_id or "" for f in s2.list_folders(BOX) for m in s2.list_messages(BOX, f)]
    assert sorted(ids) == sorted(f"<{n}@x>" for n in range(5))


def test_only_a_prestage_pass_may_leave_the_target_unread() -> None:
    """E15 records "copied and verified" (state 8; the last copy when BOX1 is never
    deleted) and E41's final pass deletes BOX1: both read the target every time. A prestage
    pass may stand on the last verified pass while the source is unchanged (issue 22)."""
    modes = Modes(data_transfer="copy")
    assert options_from_modes(modes, "prestage").leave_target
    assert not options_from_modes(modes, "copy").leave_target
    assert not options_from_modes(modes, "final").leave_target
