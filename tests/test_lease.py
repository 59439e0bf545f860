"""The lease: one reconciler acts at a time; a stale lease is taken over.

Unit level on a real SQLite store (compare-and-set under a race of threads, renewal, expiry
and take-over), then two reconcilers as real processes: an `--apply` meeting a lease held by
another host waits, names the holder and gives up after `--lease-timeout`; an expired one is
taken over and said so.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from reconciler.lease import Lease, LeaseHeld
from reconciler.state.model import utcnow
from reconciler.state.store import Store, open_store

from world import World, placement, run_cli

pytestmark = pytest.mark.timeout(120)


class Clock:
    """A clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


def _store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'state.db'}")


def test_one_holder_renewal_expiry_and_takeover(tmp_path: Path) -> None:
    store, clock = _store(tmp_path), Clock()
    a = Lease(store, holder="host-a:1", ttl=30, clock=clock)
    b = Lease(store, holder="host-b:2", ttl=30, clock=clock)
    assert a.try_acquire() is None
    held = b.try_acquire()
    assert held is not None and held.holder == "host-a:1"
    with pytest.raises(LeaseHeld, match="host-a:1"):
        b.acquire(timeout=0.2, poll=0.05)
    clock.now += timedelta(seconds=20)
    assert a.renew()  # renewed: still a's for 30 s from now
    clock.now += timedelta(seconds=20)
    assert b.try_acquire() is not None
    clock.now += timedelta(seconds=11)  # a stopped renewing: stale
    assert b.try_acquire() is None
    assert b.took_over is not None and b.took_over.holder == "host-a:1"
    assert not a.renew() and a.lost.is_set()  # a learns it lost the lease
    b.release()
    assert b.read() is None


def test_compare_and_set_race_has_one_winner(tmp_path: Path) -> None:
    store = _store(tmp_path)
    leases = [Lease(store, holder=f"host-{i}:{i}", ttl=30) for i in range(8)]
    results: dict[str, bool] = {}
    start = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        start.wait()
        results[lease.holder] = lease.try_acquire() is None

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(results.values()) == 1


def test_second_reconciler_waits_names_the_holder_and_takes_over_stale(
        world: World, tmp_path: Path) -> None:
    specs = world.write(tmp_path / "v1", [placement("home", "s1",
                                                    [{"address": "lease@corp.example"}])])
    state = tmp_path / "state.db"
    other = Lease(open_store(f"sqlite:///{state}"), holder="other-host:4242", ttl=60)
    other.acquire(timeout=1)
    try:
        refused = run_cli("--specs", str(specs), "--state", str(state), "--apply",
                          "--lease-timeout", "1", cwd=tmp_path)
        assert refused.returncode == 1
        assert "waiting up to 1 s for the lease held by other-host:4242" in refused.stderr
        assert "another reconciler holds the lease: other-host:4242" in refused.stderr
        assert "applied" not in refused.stdout
    finally:
        other._stop.set()  # stop renewing without giving it back: the lease goes stale
    stale = Lease(open_store(f"sqlite:///{state}"), holder="other-host:4242", ttl=60,
                  clock=lambda: utcnow() - timedelta(seconds=120))
    assert stale.try_acquire() is None  # re-stamped two minutes in the past: expired
    took = run_cli("--specs", str(specs), "--state", str(state), "--apply", cwd=tmp_path)
    assert took.returncode == 0, took.stderr
    assert "took over the stale lease of other-host:4242" in took.stderr
    assert "applied create   lease@corp.example" in took.stdout
    assert stale.read() is None  # released on exit
