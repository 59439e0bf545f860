"""The commands with workers, as an admin runs them: `reconcile --apply --workers` (a
re-run queues nothing twice), `reconcile --watch --workers`, `reconcile prestage --workers`
(helpers: tests/workerutil.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.state.model import DataJob, utcnow
from reconciler.workers.queue import Queue

from helpers.processes import stop_process
from helpers.waiting import wait_for
from pgutil import PrivatePostgres
from workerutil import Workers, copy_events, prepared, seed, states
from world import REPO, World, mailbox_message_ids, placement, policy, run_cli

pytestmark = pytest.mark.timeout(240)


def test_a_rerun_or_a_second_reconciler_queues_a_step_once(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """No worker yet: two reconcilers in turn (each gives up waiting after a second) plan
    the same copy; one job and one row are queued, and the mailbox is copied once."""
    engine, seeded = prepared(world, postgres, tmp_path, "once", 1, 5, {"po": {}})
    (address, ids), = seeded.items()
    for _ in range(2):
        again = world.engine(Path(engine.specs.root), postgres.url)
        again.jobs = queue = Queue(again.store, max_wait=1.0)
        again.apply()
        queue.close()
    with engine.store.engine.connect() as conn:
        jobs = conn.exec_driver_sql(
            "SELECT count(*) FROM procrastinate_jobs WHERE args->>'migration_id' = "
            "(SELECT id::text FROM migrations WHERE address = %(a)s)", {"a": address}).scalar()
    with engine.store.session() as session:
        rows = session.scalars(select(DataJob).where(DataJob.address == address)).all()
    assert jobs == 1 and [(r.step, r.status) for r in rows] == [("E15", "queued")]
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        workers.start()
        # The command an admin runs: it waits for the workers' results, then exits 0.
        done = run_cli("--specs", str(engine.specs.root), "--state", postgres.url, "--apply",
                       "--workers", "--allow-dirty", cwd=tmp_path, timeout=120)
    finally:
        workers.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert states(engine, {address}) == Counter({13: 1})
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}
    assert [d["worker"] for d in copy_events(engine, seeded)] == [
        f"{os.uname().nodename}:{workers.procs[0].pid}"]


def test_prestage_on_workers_copies_before_the_cutover(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """A window two days ahead: E2 creates BOX2 now (state 1, prestageLead 3d) and
    `reconcile prestage --workers` has a worker copy the bulk; the state does not move,
    PRESTAGE is recorded."""
    start = (utcnow() + timedelta(days=2)).replace(microsecond=0)
    address, later = "pre0@corp.example", {
        "apiVersion": "mailferry/v1", "kind": "MigrationWindow", "metadata": {"name": "later"},
        "spec": {"timeZone": "UTC", "windows": [
            {"kind": "allow", "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
             "end": (start + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%SZ")}]}}
    spec = policy("pp", prestageCopy=True, prestageLead="3d")
    box = [{"address": address}]
    home = world.write(tmp_path / "home", [spec, placement("home-pre", "s1", box,
                                                           policy_name="pp")])
    engine = world.engine(home, postgres.url)
    assert engine.apply().errors == []
    ids = seed(engine, address, 8)
    moved = world.write(tmp_path / "moved", [spec, later, placement(
        "wave-pre", "s2", box, policy_name="pp", window="later")])
    engine = world.engine(moved, postgres.url)
    assert engine.apply().errors == []
    assert states(engine, {address}) == Counter({1: 1})
    workers = Workers(moved, postgres.url, tmp_path)
    try:
        workers.start()
        done = run_cli("--specs", str(moved), "--state", postgres.url, "prestage", "--workers",
                       cwd=tmp_path, timeout=120)
    finally:
        workers.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{address}: prestaged (8 copied, 0 present)" in done.stdout
    assert states(engine, {address}) == Counter({1: 1})
    (event,) = copy_events(engine, {address}, "PRESTAGE")
    assert event["copied"] == 8
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}


def test_watch_with_workers_moves_a_mailbox(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """`reconcile --watch --workers` queues the data steps and turns the worker's results
    into transitions as they come, up to state 13; SIGTERM ends it."""
    engine, seeded = prepared(world, postgres, tmp_path, "watch", 1, 6, {"pw": {}})
    (address, ids), = seeded.items()
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    watch = None
    try:
        workers.start()
        with open(tmp_path / "watch.log", "wb") as log:
            watch = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "--specs", str(engine.specs.root),
                 "--state", postgres.url, "--watch", "--workers", "--allow-dirty",
                 "--interval", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: states(engine, {address}) == Counter({13: 1}), 90,
                 "the watch to finish the migration")
        assert stop_process(watch, 30) == 0
    finally:
        stop_process(watch)
        workers.stop()
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}
    (e15,) = copy_events(engine, seeded)
    assert e15["worker"] == f"{os.uname().nodename}:{workers.procs[0].pid}"
