"""Lease fencing: a reconciler that lost its lease cannot hold or flip in fed any more.

The lease's generation grows on every acquisition (and survives release); the holder sends
it as `Mailferry-Fence` with every mutating call; fed keeps the highest it has seen in its
shared database and refuses a lower one (409, "fenced"), checked again inside each write
transaction. Real fed, real state store; the "pause" is a lease that stopped renewing
past its TTL, exactly what a stopped VM or a partition looks like to the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.errors import LeaseLost, PermanentError
from reconciler.fedclient import FedClient
from reconciler.lease import Lease
from reconciler.state.model import Event, Migration
from reconciler.state.store import open_store

from fedutil import TOKEN, FakeSystem, Fed
from sysutil import free_port
from world import World, placement, policy

pytestmark = pytest.mark.timeout(120)

ANN = "ann@corp.example"


class Clock:
    def __init__(self) -> None:
        from datetime import UTC, datetime

        self.now = datetime.now(UTC)

    def __call__(self):  # type: ignore[no-untyped-def]
        return self.now


def test_generation_grows_on_every_acquisition_and_survives_release(tmp_path: Path) -> None:
    store, clock = open_store(f"sqlite:///{tmp_path / 's.db'}"), Clock()
    a = Lease(store, holder="host-a:1", ttl=30, clock=clock)
    b = Lease(store, holder="host-b:2", ttl=30, clock=clock)
    assert a.try_acquire() is None and a.generation == 1
    clock.now += timedelta(seconds=31)  # a stalled: b takes over
    assert b.try_acquire() is None and b.generation == 2
    b.release()
    assert b.read() is None
    assert a.try_acquire() is None and a.generation == 3  # never back to 1
    assert a.fence == (b.fence_id, 3) and len(b.fence_id) == 32  # one id for the lease row


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Fed]:
    port = free_port()
    running = Fed(tmp_path / "fed", [FakeSystem("s1", port=free_port())],
                  extra=["--control", f"127.0.0.1:{port}"]).start()
    yield running
    running.kill()


def _client(fed: Fed, generation: int | None, lease: str = "store-1") -> FedClient:
    client = FedClient(f"http://127.0.0.1:{fed.control_port}", TOKEN)
    client.fence = None if generation is None else (lease, generation)
    return client


def test_fed_refuses_an_older_token_even_after_a_restart(fed: Fed) -> None:
    new, old, admin = _client(fed, 7), _client(fed, 6), _client(fed, None)
    new.put_entry(ANN, "ann@s1.invalid")
    with pytest.raises(LeaseLost, match=r"fencing token 6 is older than 7"):
        old.hold([ANN])
    assert new.holds() == {}  # refused before anything was held
    assert fed.stop() == 0
    fed.start()  # the highest token is in the shared database, not in memory
    with pytest.raises(LeaseLost):
        old.flip([ANN], "ann@s1.invalid", "ann@s2.invalid")
    assert old.lookup(ANN) == "ann@s1.invalid"  # reads are never fenced
    admin.put_entry("bob@corp.example", "bob@s1.invalid")  # no token: an admin's call
    assert _client(fed, 8).release([ANN]).not_held == [ANN]  # a newer one raises the bar
    with pytest.raises(LeaseLost, match=r"fencing token 7 is older than 8"):
        new.put_entry(ANN, "ann@s2.invalid")
    # Another state store's lease has its own generations: not fenced by this one's.
    _client(fed, 1, lease="store-2").put_entry(ANN, "ann@s1.invalid")
    with pytest.raises(PermanentError, match="400 Mailferry-Fence must be LEASE-ID/GENERATION"):
        _raw_fence(fed, "7")  # a bare number: which lease?


def test_a_paused_reconciler_is_refused_by_fed(world: World, tmp_path: Path) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p")
    box = [{"address": "paused@corp.example", "aliases": ["paused.a@corp.example"]}]
    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    world.engine(home, state).apply()
    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])

    paused = world.engine(moved, state)
    clock = Clock()
    lease_a = Lease(paused.store, holder="host-a:1", ttl=30, clock=clock)
    assert lease_a.try_acquire() is None  # no renewal thread: it will not renew (paused)
    paused.fed.fence = lease_a.fence
    reached = None
    for _ in range(10):  # bounded: one step per pass, up to the hold (E5 is next at 4)
        with paused.store.session() as session:
            reached = session.scalars(select(Migration.state).where(
                Migration.address == "paused@corp.example")).first()
        if reached == 4:
            break
        paused.apply_changes(paused.plan().due())
    assert reached == 4

    # The paused one's lease expires; another reconciler takes it over and talks to fed.
    clock.now += timedelta(seconds=31)
    other = world.engine(moved, state)
    lease_b = Lease(other.store, holder="host-b:2", ttl=30, clock=clock)
    assert lease_b.try_acquire() is None and lease_b.generation == lease_a.generation + 1
    other.fed.fence = lease_b.fence
    other.fed.put_system("s1", *_endpoint(other, "s1"))

    # The paused one wakes up with E5 (verify and hold) due: fed refuses it.
    report = paused.apply_changes(paused.plan().due())
    assert paused.lease_lost is not None, report
    [refused] = report.errors
    assert refused.step == "E5" and "fencing token" in refused.message, refused
    assert paused.fed.holds() == {}
    with paused.store.session() as session:
        m = session.scalars(select(Migration).where(
            Migration.address == "paused@corp.example")).one()
        assert (m.state, m.failed_reason, m.last_error, m.attempts) == (4, None, None, 0)
        assert session.scalars(select(Event).where(Event.migration_id == m.id,
                                                   Event.step == "error")).all() == []


def _raw_fence(fed: Fed, value: str) -> None:
    """A release with a hand-written Mailferry-Fence header (fed's answer as the client's
    error)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", fed.control_port, timeout=10)
    conn.request("POST", "/v1/release", body=json.dumps({"addresses": [ANN]}), headers={
        "Authorization": f"Bearer {TOKEN}", "Mailferry-Fence": value,
        "Content-Type": "application/json"})
    answer = conn.getresponse()
    body = json.loads(answer.read())
    conn.close()
    raise PermanentError(f"{answer.status} {body['error']}")


def _endpoint(engine, system: str) -> tuple[str, int, str]:  # type: ignore[no-untyped-def]
    point = engine.drivers[system].delivery_endpoint()
    return point.host, point.port, point.protocol


def test_apply_stops_with_exit_1_when_a_newer_holder_called_fed(world: World,
                                                                 tmp_path: Path) -> None:
    from world import run_cli

    state = f"sqlite:///{tmp_path / 'state.db'}"
    box = [{"address": "fenced-cli@corp.example"}]
    specs = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    first = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    store = open_store(state)
    with store.session() as session:
        from reconciler.state.model import Lease as LeaseRow

        row = session.get_one(LeaseRow, "reconciler")
        fence_id, generation = row.fence_id, row.generation
    assert (row.holder, generation) == ("", 1)  # released, generation kept
    # A reconciler on this store with generation 5 (one that took over meanwhile) called fed.
    newer = world.engine(specs, state)
    newer.fed.fence = (fence_id, 5)
    newer.fed.put_system("s1", *_endpoint(newer, "s1"))

    moved = world.write(tmp_path / "v2", [placement("wave", "s2", box)])
    second = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "error: stopped, the lease is lost: fed refused PUT" in second.stderr
    assert "fencing token 2 is older than 5" in second.stderr
    with store.session() as session:  # nothing was done: not even the migration recorded
        assert session.scalars(select(Migration).where(
            Migration.address == "fenced-cli@corp.example")).all() == []
