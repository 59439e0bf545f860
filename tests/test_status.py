"""`reconcile status`, suspend/resume, retry and the wave report, through the CLI.

- the status table filtered by placement, system and state;
- a suspended placement takes no step (plan and apply say so) until resumed; both are in
  the event history;
- a failed migration stays frozen until `reconcile retry`, then resumes at its state;
- when a placement finishes, a wave report is written (and mailed through fed to the
  placement's `reportTo`, found in that mailbox).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import ApplyReport
from reconciler.state.model import Migration
from reconciler.state.store import open_store

from world import World, placement, policy, run_cli

pytestmark = pytest.mark.timeout(180)
KEEP = policy("keep", deleteSource="never")


def test_status_filters_suspend_resume(world: World, tmp_path: Path) -> None:
    a, b, c = "st-a@corp.example", "st-b@corp.example", "st-c@corp.example"
    state = str(tmp_path / "state.db")
    home = world.write(tmp_path / "v1", [placement("home", "s1", [{"address": x}
                                                                  for x in (a, b, c)])])
    assert run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path).returncode == 0
    specs = world.write(tmp_path / "v2", [KEEP,
                                          placement("home", "s1", [{"address": c}]),
                                          placement("wave", "s2", [{"address": a}, {"address": b}],
                                                    policy_name="keep")])
    cli = ("--specs", str(specs), "--state", state)

    suspended = run_cli(*cli, "suspend", "wave", "--reason", "freeze", cwd=tmp_path)
    assert suspended.returncode == 0 and "placement wave suspended" in suspended.stdout
    applied = run_cli(*cli, "--apply", cwd=tmp_path)
    assert applied.returncode == 0 and "  applied " not in applied.stdout
    plan = run_cli(*cli, "--plan", cwd=tmp_path)
    assert "suspended by an admin" in plan.stdout

    table = run_cli(*cli, "status", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["ADDRESS", "PLACEMENT", "SOURCE"]
    assert "3 mailboxes; lease held by nobody" in table.stdout
    rows = [json.loads(line) for line in
            run_cli(*cli, "status", "--placement", "wave", "--json", cwd=tmp_path)
            .stdout.splitlines()]
    assert {r["address"] for r in rows} == {a, b}
    assert {r["action"] for r in rows} == {"suspended"}
    assert {r["source"] + ">" + r["target"] for r in rows} == {"s1>s2"}
    only_c = run_cli(*cli, "status", "--state", "in-sync", "--json", cwd=tmp_path)
    assert [json.loads(line)["address"] for line in only_c.stdout.splitlines()] == [c]
    by_system = run_cli(*cli, "status", "--system", "s2", "--json", cwd=tmp_path)
    assert len(by_system.stdout.splitlines()) == 2
    bad = run_cli(*cli, "status", "--state", "sleepy", cwd=tmp_path)
    assert bad.returncode == 1 and "unknown state filter" in bad.stderr

    assert run_cli(*cli, "resume", "wave", cwd=tmp_path).returncode == 0
    done = run_cli(*cli, "--apply", cwd=tmp_path)
    assert done.returncode == 0 and f"applied E40      {a}" in done.stdout
    at_10 = run_cli(*cli, "status", "--state", "10", "--json", cwd=tmp_path)
    assert {json.loads(line)["address"] for line in at_10.stdout.splitlines()} == {a, b}
    history = run_cli(*cli, "events", "placement:wave", cwd=tmp_path).stdout
    assert [line.split()[1] for line in history.splitlines()] == ["suspend", "resume"]


def test_retry_a_failed_migration(world: World, tmp_path: Path) -> None:
    address = "st-retry@corp.example"
    box = [{"address": address}]
    state = str(tmp_path / "state.db")
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path)
    specs = world.write(tmp_path / "v2", [KEEP, placement("wave", "s2", box,
                                                          policy_name="keep")])
    cli = ("--specs", str(specs), "--state", state)
    store = open_store(f"sqlite:///{state}")
    run_cli(*cli, "--plan", cwd=tmp_path)
    nothing = run_cli(*cli, "retry", address, cwd=tmp_path)
    assert nothing.returncode == 1 and "no migration on record" in nothing.stderr
    # Record the migration (one pass: E1), then freeze it as E8 would (fed said no).
    engine = world.engine(specs, f"sqlite:///{state}")
    engine.register_systems()
    engine.apply_pass(ApplyReport())
    with store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        m.failed_reason, m.failed_step = "fed's verification failed: test", "E8"
    frozen = run_cli(*cli, "--apply", cwd=tmp_path)
    assert "  applied " not in frozen.stdout
    assert f"blocked E8       {address}: failed" in frozen.stdout
    failed = run_cli(*cli, "status", "--state", "failed", "--json", cwd=tmp_path)
    [row] = [json.loads(line) for line in failed.stdout.splitlines()]
    assert row["last_error"] == "fed's verification failed: test"

    again = run_cli(*cli, "retry", address, cwd=tmp_path)
    assert again.returncode == 0 and "failure at E8 cleared; resumes at state 0" in again.stdout
    done = run_cli(*cli, "--apply", cwd=tmp_path)
    assert done.returncode == 0 and "applied E40" in done.stdout, done.stdout
    history = run_cli(*cli, "events", address, cwd=tmp_path).stdout
    assert "retry" in [line.split()[1] for line in history.splitlines()]


def test_wave_report_written_and_mailed(world: World, tmp_path: Path) -> None:
    ops = "st-ops@corp.example"
    boxes = [{"address": f"st-wave{i}@corp.example"} for i in range(3)]
    state = str(tmp_path / "state.db")
    home = world.write(tmp_path / "v1", [placement("home", "s1", [*boxes, {"address": ops}])])
    run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path)
    old = world.engine(home, f"sqlite:///{state}").drivers["s1"]
    for n, box in enumerate(boxes):  # old mail to copy: the report charts its copy rate
        old.append_message(mailbox_id_for(box["address"]), "INBOX",
                           f"Subject: old {n}\r\nMessage-ID: <old{n}@st>\r\n\r\nold\r\n"
                           .encode())
    wave = placement("wave", "s2", boxes, policy_name="p")
    wave["spec"]["reportTo"] = [ops]
    specs = world.write(tmp_path / "v2", [policy("p"), wave,
                                          placement("home", "s1", [{"address": ops}])])
    reports = tmp_path / "reports"
    done = run_cli("--specs", str(specs), "--state", state, "--apply", "--reports",
                   str(reports), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wave report for placement wave" in done.stderr and f"mailed to {ops}" in done.stderr
    [text] = list(reports.glob("wave-wave-*.txt"))
    body = text.read_text()
    assert "mailboxes moved:                  3" in body
    assert "old mailboxes deleted (E41):      3" in body
    assert "failures:                         0" in body
    data = json.loads(text.with_suffix(".json").read_text())
    assert data["moved"] == 3 and data["failed"] == []
    # The HTML version: the same figures and three charts as inline SVG, one bar per
    # mailbox for the held time and the copy rate, one per step for the step times.
    page = text.with_suffix(".html").read_text()
    assert "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # self-contained: nothing fetched
    assert set(data["held_seconds"]) == {b["address"] for b in boxes}
    assert set(data["copy_rates"]) == {b["address"] for b in boxes}
    assert {"E9", "E15", "E41-E42"} <= set(data["step_seconds"])
    for chart, bars in (("held-seconds", 3), ("copy-rates", 3),
                        ("step-seconds", len(data["step_seconds"]))):
        svg = page.split(f'<div id="{chart}">')[1].split("</div>")[0]
        assert svg.startswith("<svg") and svg.count("<rect") == bars, chart
    assert all(f">{b['address']}</text>" in page for b in boxes)
    again = run_cli("--specs", str(specs), "--state", state, "--apply", "--reports",
                    str(reports), cwd=tmp_path)
    assert "wave report" not in again.stderr and len(list(reports.glob("*.txt"))) == 1

    s1 = world.engine(specs, f"sqlite:///{state}").drivers["s1"]
    deadline = time.monotonic() + 20
    subjects: list[str] = []
    while time.monotonic() < deadline and not subjects:
        for msg in s1.list_messages(mailbox_id_for(ops), "INBOX"):
            raw = s1.read_message(mailbox_id_for(ops), "INBOX", msg.key)
            if b"mailferry: wave wave finished (3 moved, 0 failed)" in raw:
                subjects.append(msg.key)
        time.sleep(0.2)
    assert subjects, "the wave report never reached the ops mailbox"
