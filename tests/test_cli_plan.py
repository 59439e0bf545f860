"""`reconcile --plan/--apply` as a CI job sees them: exit codes, lines, JSON Lines, --at.

Real processes throughout: the CLI runs as a subprocess against fed and the maildir systems
of a running world. The pure plan is also checked without any server for the timing rules
(window, prestage and recheck lead times, max parallel).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.plan import MigrationView, make_plan
from reconciler.spec.model import DesiredMailbox, PolicySpec, SourceLocation, WindowRule, WindowSpec

from world import World, placement, policy, run_cli

pytestmark = pytest.mark.timeout(120)



def test_plan_apply_exit_codes_and_lines(world: World, tmp_path: Path) -> None:
    box = [{"address": "cli@corp.example", "aliases": ["cli.alias@corp.example"]}]
    state = str(tmp_path / "state.db")
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])

    plan = run_cli("--specs", str(home), "--state", state, "--plan", cwd=tmp_path)
    assert plan.returncode == 2, plan.stderr
    assert "+ cli@corp.example" in plan.stdout and "(new) -> s1" in plan.stdout
    assert plan.stdout.rstrip().splitlines()[-1].startswith("Plan: 1 mailboxes, 1 due now,")

    applied = run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    again = run_cli("--specs", str(home), "--state", state, "--plan", cwd=tmp_path)
    assert again.returncode == 0
    assert "No changes" in again.stdout

    moved = world.write(tmp_path / "v2", [policy("keep", deleteSource="never"),
                                          placement("wave", "s2", box, policy_name="keep")])
    lines = run_cli("--specs", str(moved), "--state", state, "--plan", "--json", cwd=tmp_path)
    assert lines.returncode == 2
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert records[0]["type"] == "version" and records[0]["format"] == "mailferry.plan/v1"
    [change] = [r for r in records if r["type"] == "change"]
    assert (change["address"], change["source"], change["target"], change["step"]) == (
        "cli@corp.example", "s1", "s2", "E1")
    assert records[-1]["type"] == "summary" and records[-1]["pending"] is True

    done = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("E1", "E2", "E4", "E5-E8", "E9", "E11-E14", "E15", "E40"):
        assert f"applied {step} " in done.stdout, done.stdout
    assert "E41" not in done.stdout  # deleteSource: never
    final = run_cli("--specs", str(moved), "--state", state, "--plan", cwd=tmp_path)
    assert final.returncode == 0, final.stdout

    history = run_cli("--specs", str(moved), "--state", state, "events", "cli@corp.example",
                      cwd=tmp_path)
    assert [line.split()[1] for line in history.stdout.splitlines()][:3] == ["create", "E1", "E2"]


NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
LOC = SourceLocation("t.yaml", 1)


def _desired(address: str, *, window: WindowSpec | None, pol: PolicySpec) -> DesiredMailbox:
    return DesiredMailbox(address=address, aliases=(), system="s2", placement="p",
                          window=window, policy=pol, station=None)


def _migration(mid: int, address: str, state: int, pol: PolicySpec) -> MigrationView:
    return MigrationView(id=mid, address=address, source_system="s1", target_system="s2",
                         state=state, state_since=NOW - timedelta(hours=1), modes=pol.modes(),
                         placement="p")


def test_pure_plan_timing_rules() -> None:
    window = WindowSpec("evening", "UTC", (WindowRule(
        "allow", start=NOW + timedelta(days=3), end=NOW + timedelta(days=3, hours=4)),), LOC)
    pol = PolicySpec("p", station_checks=True, prestage_lead=timedelta(days=1),
                     recheck_lead=timedelta(hours=2), max_parallel=1)
    desired = {a: _desired(a, window=window, pol=pol) for a in ("a@x.example", "b@x.example",
                                                                 "c@x.example")}
    migrations = [_migration(1, "a@x.example", 0, pol), _migration(2, "b@x.example", 2, pol),
                  _migration(3, "c@x.example", 3, pol)]
    directory = {a: f"{a.replace('@', '=')}@s1.invalid" for a in desired}

    plan = make_plan(desired, migrations, directory, NOW)
    by = {c.address: c for c in plan.changes}
    assert (by["a@x.example"].step, by["a@x.example"].due) == ("E2", NOW + timedelta(days=2))
    assert (by["b@x.example"].step, by["b@x.example"].due) == (
        "E21", NOW + timedelta(days=3) - timedelta(hours=2))
    assert (by["c@x.example"].step, by["c@x.example"].due) == ("E4", NOW + timedelta(days=3))
    assert plan.due() == [] and plan.pending

    opened = make_plan(desired, migrations, directory, NOW + timedelta(days=3, minutes=1))
    by = {c.address: c for c in opened.changes}
    assert by["c@x.example"].due_at(opened.at)
    # max parallel 1: a second mailbox at state 3 must wait for the slot.
    migrations.append(_migration(4, "d@x.example", 3, pol))
    desired["d@x.example"] = _desired("d@x.example", window=window, pol=pol)
    directory["d@x.example"] = "d=x.example@s1.invalid"
    crowded = make_plan(desired, migrations, directory, NOW + timedelta(days=3, minutes=1))
    waits = [c for c in crowded.changes if c.step == "E4" and not c.due_at(crowded.at)]
    assert [c.reason for c in waits] == ["max parallel migrations reached"]
