"""`reconcile --watch` as a real subprocess against real servers.

- an edit of the specs is picked up without waiting for the interval (60 s here);
- a window opening a few seconds ahead wakes the loop at the opening, not at the interval;
- while it runs, a second reconciler (`--apply`) is refused, naming the watcher's pid;
- SIGTERM ends it cleanly: exit 0, lease given back.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.lease import current_holder
from reconciler.state.model import Event
from reconciler.state.store import open_store

from helpers.waiting import wait_seconds
from world import World, placement, policy, run_cli

pytestmark = pytest.mark.timeout(120)
KEEP = policy("keep", deleteSource="never")


def _events(state: Path, address: str) -> list[Event]:
    if not state.exists():
        return []
    with open_store(f"sqlite:///{state}").session() as session:
        return list(session.scalars(select(Event).where(Event.address == address)
                                    .order_by(Event.id)))


@pytest.fixture
def watch_proc(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _start(specs: Path, state: Path, cwd: Path, procs: list[subprocess.Popen[str]]
           ) -> subprocess.Popen[str]:
    log = (cwd / "watch.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state", str(state),
         "--watch", "--interval", "60"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
        text=True, env=dict(os.environ))
    procs.append(proc)
    return proc


def test_watch_reacts_to_an_edit_and_stops_on_sigterm(
        world: World, tmp_path: Path, watch_proc: list[subprocess.Popen[str]]) -> None:
    address = "watch-edit@corp.example"
    box = [{"address": address}]
    state = tmp_path / "state.db"
    specs = world.write(tmp_path / "specs", [placement("home", "s1", box)])
    proc = _start(specs, state, tmp_path, watch_proc)
    wait_seconds(lambda: any(e.step == "create" for e in _events(state, address)), 30,
              "the mailbox to be created")

    # A second reconciler meanwhile: refused, naming the watcher.
    other = run_cli("--specs", str(specs), "--state", str(state), "--apply",
                    "--lease-timeout", "1", cwd=tmp_path)
    assert other.returncode == 1
    assert f":{proc.pid}" in other.stderr and "holds the lease" in other.stderr

    time.sleep(0.5)
    world.write(specs, [KEEP, placement("wave", "s2", box, policy_name="keep")])
    took = wait_seconds(lambda: any(e.step == "E40" for e in _events(state, address)), 30,
                     "the edit to be applied through E40")
    print(f"watch: edit -> E40 applied in {took:.2f} s")  # the benchmark measures this

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    log = (tmp_path / "watch.log").read_text()
    assert "watch: stopped" in log
    # world.write deletes and rewrites two files (many events): one reload for the save.
    assert log.count("specs reloaded") == 1, log
    assert current_holder(open_store(f"sqlite:///{state}")) is None


def test_watch_wakes_when_a_window_opens(
        world: World, tmp_path: Path, watch_proc: list[subprocess.Popen[str]]) -> None:
    address = "watch-window@corp.example"
    box = [{"address": address}]
    state = tmp_path / "state.db"
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    assert run_cli("--specs", str(home), "--state", str(state), "--apply",
                   cwd=tmp_path).returncode == 0
    opens = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    window = {"apiVersion": "mailferry/v1", "kind": "MigrationWindow",
              "metadata": {"name": "soon"},
              "spec": {"timeZone": "UTC", "windows": [{
                  "kind": "allow", "start": opens.isoformat().replace("+00:00", "Z"),
                  "end": (opens + timedelta(hours=1)).isoformat().replace("+00:00", "Z")}]}}
    specs = world.write(tmp_path / "v2", [KEEP, window, placement(
        "wave", "s2", box, policy_name="keep", window="soon")])
    proc = _start(specs, state, tmp_path, watch_proc)
    wait_seconds(lambda: any(e.step == "E1" for e in _events(state, address)), 30,
              "E1 (recorded at once, the window closed)")
    assert not any(e.step == "E2" for e in _events(state, address))
    wait_seconds(lambda: any(e.step == "E2" for e in _events(state, address)), 30,
              "E2 once the window opens")
    [e2] = [e for e in _events(state, address) if e.step == "E2"]
    late = (e2.at - opens).total_seconds()
    print(f"watch: window opened -> E2 applied after {late:.2f} s")
    assert late >= 0  # never before the window
    assert late < 30  # woken by the due instant, not by the 60 s interval
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
