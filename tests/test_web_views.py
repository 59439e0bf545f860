"""The status page's pure view code: a hand-made snapshot in, the figures people read out.

A wave of four mailboxes: one waiting, one copying (half its bytes done), one done, one
failed. Its bar, copy figures, ETA and window fit follow from the snapshot alone; a window
too short for what is left at the measured rate says it will not fit. The table pages and
filters like `reconcile status`; the failures list the retry command.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reconciler.plan import Change, MigrationView, Plan
from reconciler.spec.model import SourceLocation, WindowRule, WindowSpec
from reconciler.spec.modes import Modes
from reconciler.web import views
from reconciler.web.views import CopyFacts, FedPanel, PlacementInfo, Snapshot

NOW = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)
LOC = SourceLocation("specs/w.yaml", 1)


def window(hours: float) -> WindowSpec:
    return WindowSpec("friday", "UTC", (WindowRule(
        "allow", start=NOW - timedelta(hours=1), end=NOW + timedelta(hours=hours)),), LOC)


def migration(mid: int, address: str, state: int, failed: str | None = None) -> MigrationView:
    return MigrationView(id=mid, address=address, source_system="s1", target_system="s2",
                         state=state, state_since=NOW, modes=Modes(data_transfer="copy"),
                         placement="w", failed_reason=failed, failed_step="E12" if failed
                         else None)


def snapshot(hours: float, rates: tuple[float, float] | None) -> Snapshot:
    ms = [migration(1, "a@x.example", 1), migration(2, "b@x.example", 7),
          migration(3, "c@x.example", 13), migration(4, "d@x.example", 6, "bad header")]
    changes = [
        Change("a@x.example", "step", "s1", "s2", state=1, step="E4", migration_id=1,
               placement="w"),
        Change("b@x.example", "step", "s1", "s2", state=7, step="E15", migration_id=2,
               placement="w"),
        Change("c@x.example", "in-sync", "s2", "s2", state=13, migration_id=3, placement="w"),
        Change("d@x.example", "failed", "s1", "s2", state=6, step="E11",
               reason="source data failed validation", migration_id=4, placement="w"),
    ]
    copies = {1: CopyFacts(100, 1_000_000_000), 2: CopyFacts(100, 1_000_000_000, 50,
                                                             500_000_000, running=True),
              3: CopyFacts(10, 1000, 10, 1000, verified=True)}
    return Snapshot(at=NOW, plan=Plan(NOW, changes), migrations={m.address: m for m in ms},
                    copies=copies, rates=rates,
                    placements={"w": PlacementInfo("w", "s2", window(hours), 4, "<b>x</b>")},
                    fed=FedPanel())


def test_wave_figures_eta_and_fit() -> None:
    [wave] = views.waves(snapshot(hours=10, rates=(1_000_000.0, 10.0)))
    assert wave.total == 4 and wave.done == 1 and wave.failed == 1
    assert {b.kind: b.count for b in wave.bars} == {"prestaged": 1, "copying": 1, "done": 1,
                                                    "failed": 1}
    assert sum(b.percent for b in wave.bars) == 100.0
    assert (wave.messages_done, wave.messages_total) == (60, 210)
    assert (wave.bytes_done, wave.bytes_total) == (500_001_000, 2_000_001_000)
    # 1.5 GB left at 1 MB/s: 25 minutes (150 messages at 10/s is faster): fits in 10 h.
    assert wave.eta == "25m" and wave.fits is True
    assert wave.window_state.startswith("friday: open until")
    [short] = views.waves(snapshot(hours=0.2, rates=(1_000_000.0, 10.0)))
    assert short.fits is False and "will not fit" in short.fit
    [unknown] = views.waves(snapshot(hours=10, rates=None))
    assert unknown.fits is None and unknown.eta == "unknown"


def test_table_filters_and_failures() -> None:
    snap = snapshot(hours=10, rates=None)
    table = views.table(snap)
    assert [r.status.address for r in table.rows] == ["a@x.example", "b@x.example",
                                                      "c@x.example", "d@x.example"]
    assert [r.copy for r in table.rows] == ["0%", "50% copying", "verified", ""]
    failed = views.table(snap, state="failed")
    assert [r.status.address for r in failed.rows] == ["d@x.example"] and failed.rows[0].failed
    assert [r.status.address for r in views.table(snap, state="7").rows] == ["b@x.example"]
    [failure] = views.failures(snap)
    assert failure.command == "reconcile retry d@x.example" and failure.step == "E12"
    assert failure.reason == "source data failed validation"


def test_table_pages() -> None:
    snap = snapshot(hours=10, rates=None)
    many = [Change(f"u{i:04d}@x.example", "create", None, "s1", placement="w")
            for i in range(views.PAGE_ROWS * 2 + 5)]
    snap.plan = Plan(NOW, many)
    first, last = views.table(snap), views.table(snap, page=99)
    assert (first.matching, first.pages, len(first.rows)) == (len(many), 3, views.PAGE_ROWS)
    assert (last.page, len(last.rows)) == (3, 5)
    assert last.rows[-1].status.address == many[-1].address


def test_table_filters_the_whole_set_before_paging() -> None:
    """Filters keep from every mailbox, the page is cut from what they keep: failures and a
    second placement far past the first page are all on page 1 of their filter, counted."""
    snap = snapshot(hours=10, rates=None)
    many = [Change(f"u{i:04d}@x.example", "failed" if i % 10 == 9 else "create", None,
                   "s1", placement="w", reason="refused" if i % 10 == 9 else "")
            for i in range(views.PAGE_ROWS * 2 + 50)]
    tail = [Change(f"z{i}@x.example", "create", None, "s2", placement="late")
            for i in range(3)]
    snap.plan = Plan(NOW, many + tail)
    whole = views.table(snap)
    assert (whole.first, whole.last, whole.matching) == (1, views.PAGE_ROWS, len(many) + 3)
    assert (whole.previous, whole.next) == (None, 2)
    third = views.table(snap, page=3)
    assert (third.first, third.last, third.previous, third.next) == (
        2 * views.PAGE_ROWS + 1, len(many) + 3, 2, None)
    failed = views.table(snap, state="failed")
    assert (failed.matching, failed.pages, failed.first, failed.last) == (25, 1, 1, 25)
    assert failed.rows[-1].status.address == "u0249@x.example" and all(
        r.failed for r in failed.rows)
    for late in (views.table(snap, placement="late"), views.table(snap, system="s2")):
        assert [r.status.address for r in late.rows] == [c.address for c in tail]
        assert (late.first, late.last, late.matching, late.next) == (1, 3, 3, None)
    empty = views.table(snap, placement="nowhere")
    assert (empty.first, empty.last, empty.matching, empty.pages) == (0, 0, 0, 1)
