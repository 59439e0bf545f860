"""Which worker runs which data job, in `reconcile status` (text and JSON Lines) and on the
status page, with real `reconcile worker` processes on a private PostgreSQL: a copy running
on a worker is shown with that worker's name; after kill -9 of that worker mid-copy the
job is shown as "lease expired, waiting for another worker", then as taken by the second
worker (attempt 2), and the copy ends with every message in BOX2 once, counted by
Message-ID, and nothing deleted (helpers: tests/workerutil.py)."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from reconciler.engine import Engine
from reconciler.jobs.view import EXPIRED, JobLine
from reconciler.state.model import DataWorker
from reconciler.status import status_jobs
from reconciler.web.server import status_page_for

from helpers.waiting import wait_for
from pgutil import PrivatePostgres
from workerutil import BackgroundApply, Workers, copy_events, prepared, states
from world import World, mailbox_message_ids, run_cli

pytestmark = pytest.mark.timeout(240)


def the_job(engine: Engine, address: str) -> JobLine | None:
    """The E15 job of `address` as the status command sees it now."""
    jobs = [j for j in status_jobs(engine, []).jobs if j.address == address]
    return jobs[0] if jobs else None


def wait_job(engine: Engine, address: str, ok: Callable[[JobLine], bool], what: str) -> None:
    def seen() -> bool:
        job = the_job(engine, address)
        return job is not None and ok(job)
    wait_for(seen, 60, what, interval=0.2)


def status(engine: Engine, *json_flag: str) -> str:
    done = run_cli("--specs", engine.specs.root, "--state", engine.store.url, "status",
                   *json_flag, cwd=Path(engine.specs.root))
    assert done.returncode == 0, done.stderr
    return done.stdout


def records(engine: Engine, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in status(engine, "--json").splitlines()]
    return [r for r in lines if r["type"] == kind]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def page_row(url: str, address: str) -> str:
    """The row of `address` in the page's jobs table ("" when it has none)."""
    body = get(url + "/")
    if 'id="jobs"' not in body:
        return ""
    table = body.split('id="jobs"')[1].split("</table>")[0]
    return next((row for row in table.split("<tr")[1:] if f'data-address="{address}"' in row),
                "")


def test_the_worker_of_a_job_through_a_kill_and_a_takeover(
        world: World, postgres: PrivatePostgres, tmp_path: Path) -> None:
    slow: dict[str, object] = {"throttle": {"messagesPerSecond": 5},
                               "deleteSource": {"after": "0s", "consent": False}}
    engine, seeded = prepared(world, postgres, tmp_path, "who", 1, 100, {"pw": slow})
    (address, ids), = seeded.items()
    looker = world.engine(Path(engine.specs.root), postgres.url)  # the page's own engine
    host = os.uname().nodename
    workers = Workers(Path(engine.specs.root), postgres.url, tmp_path)
    applying = BackgroundApply(engine)
    with status_page_for(looker, "127.0.0.1:0") as page:
        try:
            first = workers.start()
            workers.wait_ready(engine)
            applying.start()
            one = f"{host}:{first.pid}"
            wait_for(lambda: sum(mailbox_message_ids(engine, "s2", address).values()) >= 5,
                     60, "the first worker to copy 5 messages")
            wait_job(looker, address, lambda j: j.state == "running", "the job to run")
            job = the_job(looker, address)
            assert job is not None and (job.worker, job.step, job.attempts) == (
                one, "E15", 1), job
            text = status(looker)
            row = next(line for line in text.splitlines()
                       if line.lstrip().startswith(address) and "E15 copy" in line)
            assert one in row and row.endswith("running"), text
            assert f"E15 (running on {one})" in text.splitlines()[1], text  # the mailbox's row
            assert "Data jobs on workers: 1 running, 0 queued, 1 worker" in text, text
            (running,) = records(looker, "job")
            assert (running["worker"], running["state"], running["step"]) == (one, "running",
                                                                               "E15")
            assert [(w["name"], w["running"], w["alive"]) for w in records(looker, "worker")] \
                == [(one, 1, True)]
            wait_for(lambda: f'data-worker="{one}" data-state="running"'
                     in page_row(page.url, address), 30, "the page to show the worker")
            assert f"E15 (running on {one})" in get(page.url + "/")  # the mailbox table
            assert f'data-worker="{one}" data-state="running"' in get(
                f"{page.url}/mailbox/{address}")  # and the mailbox's page

            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            partial = sum(mailbox_message_ids(engine, "s2", address).values())
            assert partial < len(ids)  # killed mid-copy
            wait_job(looker, address, lambda j: j.expired, "the lease to expire")
            text = status(looker)
            assert f"{EXPIRED} ({one} last seen" in text, text
            assert "lease expired: last seen" in text  # the dead worker's line
            (expired,) = records(looker, "job")
            assert (expired["state"], expired["worker"]) == ("lease expired", one)
            wait_for(lambda: 'data-state="lease expired"' in page_row(page.url, address), 30,
                     "the page to show the expired lease")
            assert EXPIRED in page_row(page.url, address)

            second = workers.start()
            two = f"{host}:{second.pid}"
            wait_job(looker, address, lambda j: j.state == "running" and j.worker == two,
                     "the second worker to take the job")
            (taken,) = records(looker, "job")
            assert (taken["worker"], taken["state"], taken["attempts"]) == (two, "running", 2)
            assert {w["name"]: w["alive"] for w in records(looker, "worker")} == {
                one: False, two: True}
            wait_for(lambda: f'data-worker="{two}" data-state="running"'
                     in page_row(page.url, address), 30, "the page to show the second worker")
            applying.join()
        finally:
            applying.stop()
            workers.stop()
    assert applying.outcome and applying.outcome[0].errors == [], applying.outcome
    assert states(engine, {address}) == {10: 1}
    found = mailbox_message_ids(engine, "s2", address)
    assert {i: found[i] for i in ids} == {i: 1 for i in ids}  # each exactly once
    assert set(mailbox_message_ids(engine, "s1", address)) == ids  # nothing deleted
    (done,) = copy_events(engine, seeded)
    assert done["worker"] == two and done["attempt"] == 2
    assert the_job(looker, address) is None  # recorded: no job left
    with engine.store.session() as session:  # the second stopped and said so; the first
        assert session.scalars(select(DataWorker.name)).all() == [one]  # could not
