"""Workers that fail: killed with SIGKILL mid-copy, or cut off from the database; the job
ends on another attempt with every message in BOX2 once and nothing deleted
(helpers: tests/workerutil.py)."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.drivers.base import mailbox_id_for
from reconciler.state.model import Migration

from helpers.waiting import wait_for
from pgutil import PrivatePostgres
from workerutil import (
    BackgroundApply,
    Workers,
    copy_events,
    prepared,
    states,
    with_queue,
)
from world import World, mailbox_message_ids

pytestmark = pytest.mark.timeout(240)


def test_a_worker_killed_mid_copy_hands_its_job_to_another(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    slow: dict[str, object] = {"throttle": {"messagesPerSecond": 15},
            "deleteSource": {"after": "0s", "consent": False}}
    engine, seeded = prepared(world, postgres, tmp_path, "kill", 1, 60, {"pk": slow})
    (address, ids), = seeded.items()
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    applying = BackgroundApply(engine)
    try:
        first = workers.start()
        applying.start()
        wait_for(lambda: sum(mailbox_message_ids(engine, "s2", address).values()) >= 10,
                 60, "the first worker to copy 10 messages")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        partial = sum(mailbox_message_ids(engine, "s2", address).values())
        assert partial < len(ids)  # killed mid-copy
        workers.start()
        applying.join()
    finally:
        applying.stop()
        workers.stop()
    assert applying.outcome and applying.outcome[0].errors == [], applying.outcome
    assert states(engine, {address}) == Counter({10: 1})
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}  # each exactly once
    assert set(mailbox_message_ids(engine, "s1", address)) == ids  # nothing deleted
    (done,) = copy_events(engine, seeded)
    assert done["worker"] != f"{os.uname().nodename}:{first.pid}"  # finished elsewhere


def test_a_worker_that_lost_the_database_stops_and_the_job_is_redone(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """The server ends the connection that holds a copying worker's locks: the worker
    stops at its next message and records nothing; the job runs again (attempt 2), and
    every message is in BOX2 once."""
    slow: dict[str, object] = {"throttle": {"messagesPerSecond": 15},
                               "deleteSource": {"after": "0s", "consent": False}}
    engine, seeded = prepared(world, postgres, tmp_path, "cut", 1, 45, {"pc": slow})
    (address, ids), = seeded.items()
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    applying = BackgroundApply(engine)
    try:
        workers.start()
        applying.start()
        wait_for(lambda: sum(mailbox_message_ids(engine, "s2", address).values()) >= 5,
                 60, "the worker to copy 5 messages")
        with engine.store.engine.connect() as conn:
            cut = conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE %(n)s", {"n": f"mailferry-guard %{address}%"}
            ).scalars().all()
        assert cut == [True]
        applying.join()
    finally:
        applying.stop()
        workers.stop()
    assert applying.outcome and applying.outcome[0].errors == [], applying.outcome
    assert b"the database connection broke; stopping" in (tmp_path / "worker0.log").read_bytes()
    (done,) = copy_events(engine, seeded)
    assert done["attempt"] == 2, done
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}
    assert set(mailbox_message_ids(engine, "s1", address)) == ids


def test_a_workers_permanent_error_freezes_the_migration_as_in_process(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    """E12 on a worker finds a message whose header has a NUL byte: the reconciler freezes
    the migration with the worker's reason and step, as if it had validated it itself;
    nothing is copied."""
    engine, seeded = prepared(world, postgres, tmp_path, "bad", 1, 3,
                              {"pv": {"dataTransfer": "validate-and-copy"}})
    (address, _), = seeded.items()
    engine.drivers["s1"].append_message(mailbox_id_for(address), "INBOX",
                                        b"From: x@corp.example\nSubject: b\0d\n\nbody\n")
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    try:
        workers.start()
        queue = with_queue(engine)
        report = engine.apply(max_passes=100)
        queue.close()
    finally:
        workers.stop()
    assert [(r.step, r.ok) for r in report.errors] == [("E12", False)], report.errors
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.failed_step == "E12" and m.state == 6
        assert m.failed_reason is not None and "NUL byte in header" in m.failed_reason
        assert f"(on worker {os.uname().nodename}:{workers.procs[0].pid})" in m.failed_reason
    assert mailbox_message_ids(engine, "s2", address) == Counter()
