"""One registry of steps (reconciler/steps/registry.py), and the engine runs every step
through it:

- the registry has every step the plan can produce (the step names are taken from the plan
  itself, over every mode combination and state of tests/test_plan_table.py, and from the
  plan's titles), and nothing else;
- a step the registry does not have is refused: nothing is run, the migration is frozen
  with the reason;
- E43 (the purge of a finished record) is an ordinary step: it runs through the registry,
  is reported like the others, its event goes from 13 to 13 without restarting the state's
  time, and a failing purge backs off like any step instead of escaping apply.

Against the embedded world (fed, s1 and s2 as real processes) where the engine runs.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from test_plan_table import MODES, NOW, SINCE, A, plan_line

from reconciler.engine import Engine
from reconciler.errors import PermanentError, TemporaryError
from reconciler.plan import STEP_TITLES, Change, MigrationView, make_plan
from reconciler.spec.model import DesiredMailbox, PolicySpec
from reconciler.state.model import Event, Migration
from reconciler.state.states import MigrationState
from reconciler.steps import registry
from reconciler.steps.base import Outcome, StepContext

from world import World, placement, policy

pytestmark = pytest.mark.timeout(180)


def _steps_the_plan_produces() -> set[str]:
    found = {plan_line(state, modes).step for state in MigrationState for modes in MODES}
    pol = PolicySpec("pol", station_checks=True)
    want = DesiredMailbox(address=A, aliases=(), system="s2", placement="p", window=None,
                          policy=pol, station="st1")
    waiting = MigrationView(id=1, address=A, source_system="s1", target_system="s2",
                            state=MigrationState.FIRST_CHECK, state_since=SINCE,
                            modes=pol.modes(), placement="p", station="st1",
                            station_action="check2")
    finished = dataclasses.replace(waiting, state=MigrationState.SOURCE_DELETED,
                                   target_system="s1", station_action=None)
    back = dataclasses.replace(want, allow_move_back=True)
    plans = [
        make_plan({A: want}, [waiting], {A: "a=x.example@s1.invalid"}, NOW),  # E22
        make_plan({A: want}, [], {}, NOW),  # create
        make_plan({A: want}, [], {A: "a=x.example@s1.invalid"}, NOW),  # E1
        make_plan({A: back}, [finished], {A: "a=x.example@s1.invalid"}, NOW),  # E1, back
    ]
    found |= {c.step for plan in plans for c in plan.changes}
    return {step for step in found if step is not None}


def test_the_registry_has_every_step_the_plan_can_produce_and_no_other() -> None:
    produced = _steps_the_plan_produces()
    assert {"create", "E1", "E2", "E22", "E41"} <= produced  # the cases above are reached
    # Every step the plan produces, every step it has a title for (E43: the engine's
    # purge), and no entry that no plan names.
    assert produced | {"E43"} == set(STEP_TITLES) == set(registry.STEPS)
    assert all(spec.name == name for name, spec in registry.STEPS.items())


def test_an_unknown_step_name_is_refused() -> None:
    assert registry.step_for("E9") is registry.STEPS["E9"]
    for name in ("E99", "", None, "e9"):
        with pytest.raises(PermanentError, match="in the registry"):
            registry.step_for(name)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _home(world: World, tmp_path: Path, address: str, **modes: str) -> tuple[Engine, Path]:
    """`address` at home on s1 (created), and the specs that move it to s2 written."""
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", **modes)
    box = [{"address": address}]
    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    world.engine(home, state).apply()
    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])
    return world.engine(moved, state), moved


def _migration(engine: Engine, address: str) -> Migration:
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        session.expunge(m)
        return m


def _events(engine: Engine, m: Migration) -> list[Event]:
    with engine.store.session() as session:
        events = list(session.scalars(select(Event).where(Event.migration_id == m.id)
                                      .order_by(Event.id)))
        session.expunge_all()
        return events


def test_a_change_naming_no_registered_step_runs_nothing_and_freezes(
        world: World, tmp_path: Path) -> None:
    address = "unknown-step@corp.example"
    engine, _ = _home(world, tmp_path, address, prestageLead="30d")
    engine.clock = Clock()
    engine.clock.now = datetime(2019, 12, 1, tzinfo=UTC)  # before the window: E2 not due
    engine.apply()
    m = _migration(engine, address)
    assert m.state == 0
    touched: list[str] = []
    engine.drivers["s2"].ping = lambda: touched.append("ping")  # type: ignore[method-assign]
    bad = Change(address=address, action="step", source="s1", target="s2", state=0,
                 step="E99", due=engine.clock.now, migration_id=m.id)
    [record] = engine.apply_changes([bad]).records
    assert (record.ok, record.step) == (False, "E99")
    assert record.message == "E99: no step 'E99' in the registry"
    assert touched == []
    m = _migration(engine, address)
    assert (m.state, m.failed_step, m.failed_reason) == (
        0, "E99", "E99: no step 'E99' in the registry")


def test_e43_purges_a_finished_record_through_the_registry(world: World,
                                                           tmp_path: Path) -> None:
    address = "purged@corp.example"
    engine, _ = _home(world, tmp_path, address, retention="0s")
    report = engine.apply()
    m = _migration(engine, address)
    assert (m.state, m.purged) == (13, True)
    events = _events(engine, m)
    assert [e.step for e in events][-2:] == ["E41-E42", "E43"]
    finished, purged = events[-2:]
    assert (purged.from_state, purged.to_state) == (13, 13)
    assert m.state_since == finished.at  # the purge does not restart the state's time
    assert [r.step for r in report.records if r.address == address][-1] == "E43"
    assert [r.ok for r in report.records if r.step == "E43"] == [True]
    engine.apply()  # purged once: nothing more is due
    assert [e.step for e in _events(engine, m)].count("E43") == 1


def test_a_failing_purge_backs_off_like_any_step(world: World, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    address = "purge-later@corp.example"
    engine, _ = _home(world, tmp_path, address, retention="0s")
    clock = Clock()
    engine.clock = clock
    real = registry.STEPS["E43"]
    tries: list[datetime] = []

    def locked(ctx: StepContext, change: Change) -> Outcome | None:
        tries.append(ctx.now)
        raise TemporaryError("the state store is busy", address=change.address, step="E43")

    monkeypatch.setitem(registry.STEPS, "E43", dataclasses.replace(real, run=locked))
    report = engine.apply()  # used to escape apply with the exception
    [failed] = [r for r in report.records if r.step == "E43"]
    assert not failed.ok and "the state store is busy" in failed.message
    m = _migration(engine, address)
    assert (m.state, m.purged, m.attempts) == (13, False, 1)
    assert m.next_attempt_at == clock.now + timedelta(seconds=real.backoff)
    engine.apply()  # backing off: not tried again yet
    assert len(tries) == 1
    monkeypatch.setitem(registry.STEPS, "E43", real)
    clock.now = m.next_attempt_at
    engine.apply()
    m = _migration(engine, address)
    assert (m.state, m.purged, m.attempts, m.last_error) == (13, True, 0, None)
    errors = [e for e in _events(engine, m) if e.step == "error"]
    assert len(errors) == 1 and "the state store is busy" in errors[0].detail
