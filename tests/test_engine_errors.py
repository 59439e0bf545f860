"""The engine's error model (reconciler/steps/registry.py), against the embedded world.

- a bug (an exception that is not a mailferry error) is retried three times, then the
  migration is frozen with its type and text, shown as a `!` line;
- a temporary error backs off, growing; past the step's retry limit, or its timeout, it is
  permanent too; `reconcile retry` clears it;
- a `create` that fails backs off (it used to be retried on every pass) and is frozen
  after its retries, with the reason in the plan;
- the up-sync that closes a pass failing is reported and done at the next pass, instead of
  escaping apply with a traceback.

Failures are injected at the driver's or fed client's boundary of one engine (a system
that says it is down, a driver with a bug); everything else is real.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import Engine
from reconciler.errors import TemporaryError, Waiting
from reconciler.output import change_line
from reconciler.state.model import AddressError, Event, Migration
from reconciler.status import retry
from reconciler.steps import registry

from world import World, placement, policy

pytestmark = pytest.mark.timeout(180)


class Clock:
    """The engine's clock, moved by the test (back-off and timeouts are minutes long)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _moving(world: World, tmp_path: Path, address: str) -> tuple[Engine, Clock]:
    """`address` at home on s1, the specs now want it on s2; the engine's clock is a Clock."""
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p")
    box = [{"address": address}]
    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    world.engine(home, state).apply()
    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])
    engine = world.engine(moved, state)
    clock = Clock()
    engine.clock = clock
    return engine, clock


def _migration(engine: Engine, address: str) -> Migration:
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        session.expunge(m)
        return m


def _line(engine: Engine, address: str) -> str:
    plan = engine.plan()
    [change] = [c for c in plan.changes if c.address == address]
    return change_line(change, plan.at, color=False)


def test_a_bug_is_retried_three_times_then_frozen(world: World, tmp_path: Path) -> None:
    address = "bug@corp.example"
    engine, clock = _moving(world, tmp_path, address)
    calls: list[str] = []

    def broken(mailbox_id: str) -> None:
        calls.append(mailbox_id)
        raise KeyError("internal_address")  # a driver bug, not a mailferry error

    engine.drivers["s2"].get_account = broken  # type: ignore[method-assign]
    for _ in range(10):  # bounded: each round waits out the back-off
        engine.apply()
        clock.advance(600)
    assert len(calls) == 3  # not forever
    m = _migration(engine, address)
    assert (m.state, m.failed_step) == (0, "E2")
    assert m.failed_reason is not None
    assert "unexpected KeyError: 'internal_address'" in m.failed_reason
    assert "(an unexpected error, 3 times in a row (a bug? see the log))" in m.failed_reason
    line = _line(engine, address)
    assert line.lstrip().startswith("!") and "failed at E2:" in line and "KeyError" in line, line


def test_temporary_errors_back_off_then_stop_at_the_limit(world: World, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    address = "down@corp.example"
    engine, clock = _moving(world, tmp_path, address)
    monkeypatch.setitem(registry.STEPS, "E2", dataclasses.replace(registry.STEPS["E2"],
                                                                 retries=4))
    attempts: list[datetime] = []

    def down() -> None:
        attempts.append(clock.now)
        raise TemporaryError("s2 is down (connection refused)", delay=5.0)

    engine.drivers["s2"].ping = down  # type: ignore[method-assign]
    engine.apply()
    m = _migration(engine, address)
    assert m.attempts == 1 and m.next_attempt_at == clock.now + timedelta(seconds=5)
    assert "retry after error: s2 is down" in _line(engine, address)
    engine.apply()  # not due yet: not tried again (it used to be, on every pass)
    assert len(attempts) == 1
    waits = []
    for _ in range(10):  # bounded; each round moves the clock to the next attempt
        m = _migration(engine, address)
        if m.next_attempt_at is None:
            break
        waits.append((m.next_attempt_at - clock.now).total_seconds())
        clock.now = m.next_attempt_at
        engine.apply()
    assert waits == [5.0, 10.0, 20.0] and len(attempts) == 4  # doubling, then the limit
    m = _migration(engine, address)
    assert m.failed_reason == "s2 is down (connection refused) (failed 4 times in a row)"
    with engine.store.session() as session:
        errors = session.scalars(select(Event.detail).where(
            Event.migration_id == m.id, Event.step == "error")).all()
    assert len(errors) == 1  # one event per distinct error, not one per retry

    assert retry(engine.store, address, by="test", commit=None, now=clock.now) \
        == f"{address}: failure at E2 cleared; resumes at state 0"
    del engine.drivers["s2"].ping  # the system is back
    engine.apply()
    assert _migration(engine, address).state >= 5


def test_a_step_failing_past_its_timeout_is_permanent(world: World, tmp_path: Path) -> None:
    address = "slow@corp.example"
    engine, clock = _moving(world, tmp_path, address)

    def down() -> None:
        raise TemporaryError("s2 is down", delay=5.0)

    engine.drivers["s2"].ping = down  # type: ignore[method-assign]
    engine.apply()
    clock.advance(3 * 3600)
    engine.apply()
    assert _migration(engine, address).failed_reason is None  # 3 h: still retried
    clock.advance(3 * 3600 + 1)
    engine.apply()
    reason = _migration(engine, address).failed_reason
    assert reason == "s2 is down (still failing after 6.0 h (limit 6 h))", reason


def test_a_failing_create_backs_off_and_freezes(world: World, tmp_path: Path) -> None:
    address = "new-box@corp.example"
    state = f"sqlite:///{tmp_path / 'state.db'}"
    specs = world.write(tmp_path / "v1", [placement("home", "s1", [{"address": address}])])
    engine = world.engine(specs, state)
    clock = Clock()
    engine.clock = clock
    tries: list[datetime] = []

    def refuse(*_args: object, **_kwargs: object) -> None:
        tries.append(clock.now)
        raise TemporaryError("s1 refused the new mailbox: quota of accounts reached")

    engine.drivers["s1"].create_mailbox = refuse  # type: ignore[method-assign,assignment]
    report = engine.apply()
    assert len(tries) == 1 and report.passes == 1
    assert "retry after error: s1 refused" in _line(engine, address)
    for _ in range(30):
        engine.apply()
        clock.advance(400)
    assert len(tries) == 20
    with engine.store.session() as session:
        row = session.get(AddressError, address)
        assert row is not None and row.step == "create"
        assert row.failed_reason == ("s1 refused the new mailbox: quota of accounts reached "
                                     "(failed 20 times in a row)")
    line = _line(engine, address)
    assert line.lstrip().startswith("!") and "failed at create: s1 refused" in line, line

    del engine.drivers["s1"].create_mailbox
    assert "failure at create cleared" in retry(engine.store, address, by="test", commit=None,
                                                now=clock.now)
    engine.apply()
    assert engine.drivers["s1"].get_account(mailbox_id_for(address)) is not None
    with engine.store.session() as session:
        assert session.get(AddressError, address) is None


def test_a_failed_closing_upsync_is_reported_and_done_next_pass(world: World,
                                                                tmp_path: Path) -> None:
    address = "upsync-late@corp.example"
    state = f"sqlite:///{tmp_path / 'state.db'}"
    specs = world.write(tmp_path / "v1", [placement("home", "s1", [{"address": address}])])
    engine = world.engine(specs, state)
    real = engine.fed.upsync
    refused: list[str] = []

    def fed_down(system: str, mailboxes: dict[str, list[str]]) -> object:
        refused.append(system)
        raise TemporaryError(f"cannot connect to fed at {engine.fed.base_url}: refused")

    engine.fed.upsync = fed_down  # type: ignore[method-assign,assignment]
    report = engine.apply()  # used to escape apply with the traceback
    assert refused == ["s1"] and report.passes == 1
    [failed] = report.errors
    assert (failed.address, failed.step) == ("system s1", "E6")
    assert failed.message.startswith("cannot connect to fed")
    assert engine.fed.lookup(address) is None
    engine.fed.upsync = real  # type: ignore[method-assign]
    engine.apply()
    physical = engine.fed.lookup(address)
    assert physical is not None and physical.endswith("@s1.invalid"), physical


def test_a_wait_the_specs_ask_for_is_no_error(world: World, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A step raising `Waiting` (a system's daily budget spent) is retried after exactly
    its delay, as often as it takes: it never counts against the step's retries, and the
    plan shows its own words, not "retry after error"."""
    address = "budget@corp.example"
    engine, clock = _moving(world, tmp_path, address)
    monkeypatch.setitem(registry.STEPS, "E2", dataclasses.replace(registry.STEPS["E2"],
                                                                 retries=2))
    calls: list[datetime] = []

    def spent() -> None:
        calls.append(clock.now)
        raise Waiting("waiting: daily budget of system s2 spent (10 of 10 bytes today)",
                      delay=3600.0)

    engine.drivers["s2"].ping = spent  # type: ignore[method-assign]
    for _ in range(5):  # more than the step's two retries
        engine.apply()
        m = _migration(engine, address)
        assert m.failed_reason is None and m.attempts == 0
        assert m.next_attempt_at == clock.now + timedelta(seconds=3600)
        line = _line(engine, address)
        assert "waiting: daily budget of system s2 spent" in line, line
        assert "retry after error" not in line, line
        clock.now = m.next_attempt_at
    assert len(calls) == 5


def test_a_pass_looks_up_an_address_error_only_where_its_snapshot_had_one(
        world: World, tmp_path: Path) -> None:
    """A create / E1 asks the store for its address's earlier error only when the pass's
    snapshot held one (a round trip a mailbox at 100,000, issue 18); one that backed off is
    still found, and cleared by its success."""
    flaky, fine = "flaky@corp.example", "fine@corp.example"
    specs = world.write(tmp_path / "v1", [placement("home", "s1", [{"address": flaky},
                                                                  {"address": fine}])])
    engine = world.engine(specs, f"sqlite:///{tmp_path / 'state.db'}")
    clock = Clock()
    engine.clock = clock
    real = engine.drivers["s1"].create_mailbox
    refused: list[str] = []

    def once(mailbox_id: str, **kwargs: Any) -> Any:
        if mailbox_id == mailbox_id_for(flaky) and not refused:
            refused.append(mailbox_id)
            raise TemporaryError("s1 is busy")
        return real(mailbox_id, **kwargs)

    engine.drivers["s1"].create_mailbox = once  # type: ignore[method-assign]
    looked: list[str] = []

    def lookup(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM address_errors" in statement and "WHERE" in statement:
            looked.append(str(parameters))

    event.listen(engine.store.engine, "before_cursor_execute", lookup)
    engine.apply()
    assert refused and not any(fine in p for p in looked), looked  # fine: none seen, none asked
    assert engine.drivers["s1"].get_account(mailbox_id_for(fine)) is not None
    with engine.store.session() as session:
        assert session.get(AddressError, flaky) is not None  # backing off
    looked.clear()
    clock.advance(600)
    engine.apply()
    assert any(flaky in p for p in looked), looked  # in the snapshot: looked up, cleared
    assert engine.drivers["s1"].get_account(mailbox_id_for(flaky)) is not None
    with engine.store.session() as session:
        assert session.get(AddressError, flaky) is None
