"""A wave's cutover in one pass, batched (issue 22): one hold, one batch flip (fed's
`POST /v1/flips`, one transaction) and one release for every mailbox of the pass, each
mailbox still with its own transitions and events; against the real embedded fed, s1, s2.

- twelve mailboxes (with aliases) moving together: the pass calls fed's hold, flips and
  release once each and `POST /v1/flip` never; every row reaches 6 through 4 -> 5 -> 6, one
  event per transition, fed's directory names BOX2 for every address, every BOX1 redirects
  to its BOX2 (one transaction of s1's store), the via-fed marks are set on the sources and
  cleared on the targets, no hold is left;
- fed killed (-9) just as the batch flip is sent: nothing is flipped, every mailbox stays held
  (5) with its error recorded and no E9 event, fed's holds survive its restart, and the next
  pass flips and releases them all in one call;
- one address of the wave routed to a third physical before the flip: fed refuses the batch
  (409, all or nothing), the engine then flips the others one by one and freezes only the
  refused mailbox, held, with fed's reason.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from maildir_system.store import Store as SystemStore
from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.embedded import _start, fed_argv
from reconciler.engine import ApplyReport, Engine
from reconciler.state.model import Event, Migration

from world import World, placement, policy

pytestmark = pytest.mark.timeout(240)

Calls = Counter[tuple[str, str]]


def spy(engine: Engine, before: dict[tuple[str, str], Any] | None = None) -> Calls:
    """Count the engine's control calls to fed by (method, path); each still reaches fed.
    `before[(method, path)]` runs just before that call is sent."""
    calls: Calls = Counter()
    real = engine.fed._call

    def counted(method: str, path: str, body: dict[str, Any] | None = None,
                ok: tuple[int, ...] = ()) -> tuple[int, Any]:
        calls[(method, path)] += 1
        hook = (before or {}).get((method, path))
        if hook is not None:
            hook()
        return real(method, path, body, ok)
    engine.fed._call = counted  # type: ignore[method-assign]
    return calls


def boxes(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"address": f"{tag}{i}@corp.example", "aliases": [f"{tag}{i}.a@corp.example"]}
            for i in range(n)]


def rows(engine: Engine, tag: str) -> dict[str, Migration]:
    with engine.store.session() as session:
        found = session.scalars(select(Migration).where(Migration.address.like(f"{tag}%")))
        return {m.address: m for m in found}


def transitions(engine: Engine, tag: str) -> dict[str, list[tuple[str, int | None]]]:
    """address -> its state-changing events (step, to_state), in order."""
    with engine.store.session() as session:
        events = session.scalars(select(Event).where(Event.address.like(f"{tag}%"))
                                 .order_by(Event.id)).all()
        path: dict[str, list[tuple[str, int | None]]] = {}
        for e in events:
            if e.to_state is not None and e.to_state != e.from_state:
                path.setdefault(e.address, []).append((e.step, e.to_state))
        return path


def held_wave(world: World, tmp: Path, tag: str, n: int) -> tuple[Engine, list[dict[str, Any]]]:
    """`n` mailboxes created on s1, then moved to s2 and taken pass by pass (no chaining)
    to state 4 (addresses formed): the next pass holds them all."""
    wanted = boxes(tag, n)
    state = f"sqlite:///{tmp / 'state.db'}"
    keep = policy("keep", deleteSource="never", maxParallel=100)
    world.engine(world.write(tmp / "v1", [keep, placement("home", "s1", wanted,
                                                           policy_name="keep")]), state).apply()
    engine = world.engine(world.write(tmp / "v2", [keep, placement(
        "wave", "s2", wanted, policy_name="keep")]), state)
    engine.register_systems()
    for _ in range(10):
        if {m.state for m in rows(engine, tag).values()} == {4} \
                and len(rows(engine, tag)) == n:
            break
        due = [c for c in engine.plan().due() if c.step != "E5"]
        report = ApplyReport()
        engine.run_changes(due, report, engine.clock(), purge=False)
        assert due and all(r.ok for r in report.records), report.records
    assert {m.state for m in rows(engine, tag).values()} == {4}
    return engine, wanted


def addresses(wanted: list[dict[str, Any]]) -> list[str]:
    return [a for b in wanted for a in (b["address"], *b["aliases"])]


def box2(address: str) -> str:
    return physical_address("s2", mailbox_id_for(address))


def box1(address: str) -> str:
    return physical_address("s1", mailbox_id_for(address))


def test_one_hold_one_flip_one_release_for_the_whole_wave(world: World, tmp_path: Path) -> None:
    engine, wanted = held_wave(world, tmp_path, "wave", 12)
    calls = spy(engine)
    report = ApplyReport()
    assert engine.apply_pass(report)
    assert calls[("POST", "/v1/holds")] == 1
    assert calls[("POST", "/v1/flips")] == 1
    assert calls[("POST", "/v1/release")] == 1
    assert calls[("POST", "/v1/flip")] == 0
    assert calls[("GET", "/v1/holds")] == 1  # the waiting mail, once for the wave
    assert Counter((r.step, r.ok) for r in report.records) >= Counter(
        {("E5-E8", True): 12, ("E9", True): 12})
    found = rows(engine, "wave")
    assert {m.state for m in found.values()} == {6}
    assert all(m.hold_started_at is not None and m.address_migration_id for m in found.values())
    path = transitions(engine, "wave")
    for box in wanted:
        assert [s for _, s in path[box["address"]]] == [0, 1, 4, 5, 6]
        assert path[box["address"]][-2:] == [("E5-E8", 5), ("E9", 6)]
        for address in (box["address"], *box["aliases"]):
            assert engine.fed.lookup(address) == box2(box["address"])
        source = engine.drivers["s1"].get_account(mailbox_id_for(box["address"]))
        assert source is not None and source.redirect_to == box2(box["address"])
        # The sources' local mail went through fed from E5 on; the targets' does not from E9.
        mailbox = mailbox_id_for(box["address"])
        old, new = (SystemStore(engine.specs.systems[s].root).account(mailbox)
                    for s in ("s1", "s2"))
        assert old is not None and old.via_fed and new is not None and not new.via_fed
    with engine.store.session() as session:  # each E9 event names its own mailbox only
        e9 = {e.address: json.loads(e.detail) for e in session.scalars(
            select(Event).where(Event.step == "E9", Event.address.like("wave%")))}
    assert {a: (d["to"], sorted(d["flipped"])) for a, d in e9.items()} == {
        b["address"]: (box2(b["address"]), sorted([b["address"], *b["aliases"]]))
        for b in wanted}
    assert not set(engine.fed.holds()) & set(addresses(wanted))


@pytest.fixture
def fed_restarter(world: World) -> Iterator[list[bool]]:
    """The list `kill_fed` marks: the world's fed is restarted (same state folder and
    ports) at the end of the test if it is still down."""
    killed: list[bool] = []
    yield killed
    if world.embedded.servers[0].process.poll() is not None:
        restart_fed(world)


def kill_fed(world: World, killed: list[bool]) -> None:
    fed = world.embedded.servers[0]
    assert fed.name == "fed"
    os.kill(fed.process.pid, signal.SIGKILL)
    fed.process.wait(10)
    killed.append(True)


def restart_fed(world: World) -> None:
    specs = world.engine(world.base_dir, "sqlite://").specs
    logs = world.root / "logs"
    world.embedded.servers[0] = _start("fed", fed_argv(specs), "ready",
                                       logs / f"fed-{len(list(logs.glob('fed*')))}.log")


def test_a_failed_batch_flip_changes_nothing_and_is_retried(
        world: World, tmp_path: Path, fed_restarter: list[bool]) -> None:
    engine, wanted = held_wave(world, tmp_path, "fail", 6)
    calls = spy(engine, {("POST", "/v1/flips"):
                         lambda: None if fed_restarter else kill_fed(world, fed_restarter)})
    report = ApplyReport()
    engine.apply_pass(report)
    assert calls[("POST", "/v1/flips")] == 1 and calls[("POST", "/v1/flip")] == 0
    assert calls[("POST", "/v1/release")] == 0
    restart_fed(world)

    found = rows(engine, "fail")
    assert {m.state for m in found.values()} == {5}  # held, not flipped
    assert all(m.attempts == 1 and m.last_error and m.failed_reason is None
               and m.next_attempt_at is not None for m in found.values())
    assert [r.step for r in report.records if not r.ok and r.address in found] == ["E9"] * 6
    assert all(("E9", 6) not in p for p in transitions(engine, "fail").values())
    held = engine.fed.holds()  # fed's holds survived its restart
    for address in addresses(wanted):
        assert address in held
        assert engine.fed.lookup(address) == box1(address.replace(".a@", "@"))

    with engine.store.session() as session:  # the retry is due now, not after the back-off
        for m in session.scalars(select(Migration).where(Migration.address.like("fail%"))):
            m.next_attempt_at = None
    calls.clear()
    assert engine.apply_pass(ApplyReport(), chain=False)
    assert calls[("POST", "/v1/flips")] == 1 and calls[("POST", "/v1/release")] == 1
    assert {m.state for m in rows(engine, "fail").values()} == {6}
    assert all(m.attempts == 0 and m.last_error is None for m in rows(engine, "fail").values())
    for address in addresses(wanted):
        assert engine.fed.lookup(address) == box2(address.replace(".a@", "@"))
    assert not set(engine.fed.holds()) & set(addresses(wanted))
    for path in transitions(engine, "fail").values():
        assert [s for _, s in path] == [0, 1, 4, 5, 6]


def test_a_refused_batch_flips_the_others_and_stops_only_the_refused(
        world: World, tmp_path: Path) -> None:
    engine, wanted = held_wave(world, tmp_path, "conf", 5)
    assert engine.run_changes([c for c in engine.plan().due() if c.step == "E5"],
                              ApplyReport(), engine.clock(), purge=False)
    assert {m.state for m in rows(engine, "conf").values()} == {5}
    third = physical_address("s2", "elsewhere")
    engine.fed.put_entry("conf3.a@corp.example", third)  # someone routed it meanwhile
    calls = spy(engine)
    report = ApplyReport()
    assert engine.run_changes(engine.plan().due(), report, engine.clock(), purge=False)
    assert calls[("POST", "/v1/flips")] == 1 + 5  # refused as a whole, then one by one
    found = rows(engine, "conf")
    assert found["conf3@corp.example"].state == 5
    assert "routes to " + third in (found["conf3@corp.example"].failed_reason or "")
    assert {a: m.state for a, m in found.items() if a != "conf3@corp.example"} == \
        dict.fromkeys((b["address"] for b in wanted if b["address"] != "conf3@corp.example"), 6)
    assert engine.fed.lookup("conf3@corp.example") == box1("conf3@corp.example")
    assert engine.fed.lookup("conf3.a@corp.example") == third
    assert "conf3@corp.example" in engine.fed.holds()  # frozen held: an admin decides
    for box in wanted:
        if box["address"] != "conf3@corp.example":
            assert engine.fed.lookup(box["aliases"][0]) == box2(box["address"])
    engine.fed.release(["conf3@corp.example", "conf3.a@corp.example"])
