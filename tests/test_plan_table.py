"""The pure plan as a table: every mode combination of a policy x every state of Figure 2.

Each row names itself (`s6-checks-copy-local-delete`, ...) and states the next step the plan
must choose for a migration recorded with those modes in that state, with the window open and
nothing else in the way; a changed transition fails the rows it touches, by name. No servers,
no database: `make_plan` only (the real-process tests of the same arrows are in
tests/test_engine_modes.py). The expected steps are written from DESIGN.md's state machine,
not from plan.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import get_args

import pytest

from reconciler.plan import Change, MigrationView, make_plan
from reconciler.spec.model import DataTransfer, DesiredMailbox, PolicySpec
from reconciler.state.states import MigrationState

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
SINCE = NOW - timedelta(hours=1)
DELETE_AFTER = timedelta(days=7)
A = "a@x.example"


@dataclass(frozen=True)
class Modes:
    station_checks: bool
    transfer: DataTransfer
    local_data: bool
    delete: bool  # delete the source after DELETE_AFTER (with consent), else never

    @property
    def name(self) -> str:
        return "-".join((
            "checks" if self.station_checks else "nochecks", self.transfer,
            "local" if self.local_data else "nolocal", "delete" if self.delete else "keep"))

    def policy(self) -> PolicySpec:
        return PolicySpec(
            "pol", station_checks=self.station_checks, data_transfer=self.transfer,
            local_station_data=self.local_data,
            delete_source_after=DELETE_AFTER if self.delete else None, delete_consent=True)


@dataclass(frozen=True)
class Expect:
    """What the plan's line for the mailbox must say."""

    action: str
    step: str | None
    due: datetime | None = NOW
    reason: str = ""  # a fragment of the reason, when the plan gives one
    destructive: bool = False


def expected(state: MigrationState, modes: Modes) -> Expect:
    """DESIGN.md's Figure 2 with the arrows each mode keeps or removes."""
    diary = modes.transfer == "diary-only"
    copies = modes.transfer in ("copy", "validate-and-copy")
    station_wait = Expect("wait", "E30", None, "waiting for the station's local data")
    S = MigrationState
    table: dict[MigrationState, Expect] = {
        S.RECORDED: Expect("step", "E2"),
        S.PRESTAGED: (Expect("step", "E16") if diary
                      else Expect("wait", "E20", None, "waiting for the first station check")
                      if modes.station_checks else Expect("step", "E4")),
        S.FIRST_CHECK: Expect("step", "E21"),
        S.SECOND_CHECK: Expect("step", "E4"),
        S.ADDRESSES_FORMED: Expect("step", "E5"),
        S.HELD: Expect("step", "E9"),
        S.FLIPPED: (Expect("step", "E11") if copies
                    else station_wait if modes.local_data else Expect("step", "E40")),
        S.MOVER_TOOK: Expect("step", "E17" if diary else "E15"),
        S.DATA_COPIED: (station_wait if modes.local_data and not diary
                        else Expect("step", "E40")),
        S.STATION_DONE: Expect("step", "E40"),
        S.DONE: (Expect("step", "E41", SINCE + DELETE_AFTER, destructive=True)
                 if modes.delete and not diary else Expect("in-sync", None, None)),
        S.SOURCE_DELETED: Expect("in-sync", None, None),
    }
    return table[state]


MODES = [Modes(*combo) for combo in itertools.product(
    (False, True), get_args(DataTransfer), (False, True), (False, True))]
ROWS = [pytest.param(state, modes, id=f"s{int(state)}-{modes.name}")
        for state in MigrationState for modes in MODES]


def plan_line(state: MigrationState, modes: Modes) -> Change:
    policy = modes.policy()
    want = DesiredMailbox(address=A, aliases=(), system="s2", placement="p", window=None,
                          policy=policy, station="st1" if modes.station_checks else None)
    migration = MigrationView(
        id=1, address=A, source_system="s1", target_system="s2", state=state,
        state_since=SINCE, modes=policy.modes(), placement="p",
        station="st1" if modes.station_checks else None)
    [change] = make_plan({A: want}, [migration], {A: "a=x.example@s1.invalid"}, NOW).changes
    return change


def test_the_table_covers_every_mode_combination_and_state() -> None:
    assert len(MODES) == 32
    assert [int(s) for s in MigrationState] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13]


@pytest.mark.parametrize(("state", "modes"), ROWS)
def test_next_step(state: MigrationState, modes: Modes) -> None:
    want = expected(state, modes)
    got = plan_line(state, modes)
    assert (got.action, got.step, got.due, got.destructive) == (
        want.action, want.step, want.due, want.destructive)
    assert want.reason in got.reason
    assert got.state == state and got.migration_id == 1 and got.placement == "p"
