"""Saved plans, the JSON Lines stream and the git discipline, through the CLI.

- `--plan --out FILE` then `--apply FILE` runs exactly the reviewed changes (one step per
  mailbox, not the whole chain a plain `--apply` would run);
- a saved plan is refused as stale after a spec edit, and after the actual state moved;
- `--apply --json`: version line first, applied and error lines, summary last;
- specs with uncommitted changes are refused unless `--allow-dirty`; the commit is
  recorded with every event.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from reconciler.state.model import Event
from reconciler.state.store import open_store

from world import World, placement, policy, run_cli

pytestmark = pytest.mark.timeout(180)
KEEP = policy("keep", deleteSource="never")


def _moved(world: World, tmp_path: Path, box: list[dict[str, Any]], state: str) -> Path:
    """The box created on s1 (applied), and specs moving it to s2 (not applied)."""
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    assert run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path).returncode == 0
    return world.write(tmp_path / "v2", [KEEP, placement("wave", "s2", box, policy_name="keep")])


def test_saved_plan_applies_exactly_what_was_reviewed(world: World, tmp_path: Path) -> None:
    box = [{"address": "saved@corp.example"}]
    state = str(tmp_path / "state.db")
    moved = _moved(world, tmp_path, box, state)
    plan_file = tmp_path / "plan.json"
    planned = run_cli("--specs", str(moved), "--state", state, "--plan", "--out",
                      str(plan_file), cwd=tmp_path)
    assert planned.returncode == 2 and "plan saved to" in planned.stderr
    saved = json.loads(plan_file.read_text())
    assert saved["format"] == "mailferry.savedplan/v1"
    assert [(c["address"], c["step"]) for c in saved["changes"]] == [("saved@corp.example", "E1")]

    applied = run_cli("--specs", str(moved), "--state", state, "--apply", str(plan_file),
                      cwd=tmp_path)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "applied E1       saved@corp.example -> state 0" in applied.stdout
    assert "applied E2" not in applied.stdout  # reviewed: E1 only
    after = run_cli("--specs", str(moved), "--state", state, "--plan", cwd=tmp_path)
    assert "next E2:" in after.stdout
    # The same file again: the world moved on (the migration exists now): stale.
    again = run_cli("--specs", str(moved), "--state", state, "--apply", str(plan_file),
                    cwd=tmp_path)
    assert again.returncode == 1
    assert "stale plan: the actual state changed" in again.stderr
    assert "saved@corp.example: at " in again.stderr and "migration 1 state 0" in again.stderr


def test_stale_plan_after_a_spec_edit_or_a_state_change(world: World, tmp_path: Path) -> None:
    box = [{"address": "stale@corp.example"}]
    state = str(tmp_path / "state.db")
    moved = _moved(world, tmp_path, box, state)
    plan_file = tmp_path / "plan.json"
    run_cli("--specs", str(moved), "--state", state, "--plan", "--out", str(plan_file),
            cwd=tmp_path)
    (moved / "extra.yaml").write_text(yaml.safe_dump(
        placement("more", "s1", [{"address": "stale.more@corp.example"}])))
    edited = run_cli("--specs", str(moved), "--state", state, "--apply", str(plan_file),
                     cwd=tmp_path)
    assert edited.returncode == 1
    assert "stale plan: the specs changed" in edited.stderr and "nothing" not in edited.stdout
    (moved / "extra.yaml").unlink()

    # The specs are back as reviewed, but someone applied meanwhile: the state moved.
    run_cli("--specs", str(moved), "--state", state, "--plan", "--out", str(plan_file),
            cwd=tmp_path)
    assert run_cli("--specs", str(moved), "--state", state, "--apply",
                   cwd=tmp_path).returncode == 0
    moved_on = run_cli("--specs", str(moved), "--state", state, "--apply", str(plan_file),
                       cwd=tmp_path)
    assert moved_on.returncode == 1
    assert "stale plan: the actual state changed" in moved_on.stderr
    assert "stale@corp.example" in moved_on.stderr
    with open_store(f"sqlite:///{state}").session() as session:
        steps = [e.step for e in session.scalars(select(Event).where(
            Event.address == "stale@corp.example").order_by(Event.id))]
    assert steps.count("E1") == 1  # the stale plan applied nothing


def test_apply_json_lines_stream(world: World, tmp_path: Path) -> None:
    box = [{"address": "jsonl@corp.example"}]
    state = str(tmp_path / "state.db")
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    out = run_cli("--specs", str(home), "--state", state, "--apply", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0] == {**lines[0], "type": "version", "format": "mailferry.plan/v1",
                        "mode": "apply"}
    assert lines[-1]["type"] == "summary" and lines[-1]["applied"] == 1
    assert lines[-1]["errors"] == 0 and lines[-1]["text"].startswith("Plan: ")
    [step] = [x for x in lines if x["type"] == "applied"]
    assert (step["address"], step["step"]) == ("jsonl@corp.example", "create") and step["at"]

    # An error line: the target system is down (its LMTP port closed, its folder missing).
    docs = [dict(d) for d in world.base]
    docs[1] = {**docs[1], "spec": {**docs[1]["spec"], "maildir": {
        **docs[1]["spec"]["maildir"], "root": str(tmp_path / "missing-s2"),
        "lmtp": "127.0.0.1:1"}}}
    down = tmp_path / "down"
    down.mkdir()
    (down / "base.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (down / "wanted.yaml").write_text(yaml.safe_dump_all(
        [KEEP, placement("wave", "s2", box, policy_name="keep")], sort_keys=False))
    try:
        failed = run_cli("--specs", str(down), "--state", state, "--apply", "--json",
                         cwd=tmp_path)
    finally:
        world.engine(world.base_dir, f"sqlite:///{tmp_path / 'probe.db'}").register_systems()
    assert failed.returncode == 1
    lines = [json.loads(line) for line in failed.stdout.splitlines()]
    assert lines[0]["type"] == "version" and lines[-1]["type"] == "summary"
    errors = [x for x in lines if x["type"] == "error"]
    assert errors and (errors[0]["step"], errors[0]["address"]) == ("E2", "jsonl@corp.example")
    assert "unreachable" in errors[0]["message"]
    assert lines[-1]["errors"] == len(errors)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dirty_specs_refused_and_commit_recorded(world: World, tmp_path: Path) -> None:
    specs = world.write(tmp_path / "repo", [placement("home", "s1",
                                                      [{"address": "dirty@corp.example"}])])
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@corp.example"]
    subprocess.run([*git, "init", "-q"], cwd=specs, check=True)
    subprocess.run([*git, "add", "."], cwd=specs, check=True)
    subprocess.run([*git, "commit", "-qm", "home"], cwd=specs, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=specs, check=True,
                          capture_output=True, text=True).stdout.strip()
    state = str(tmp_path / "state.db")
    (specs / "wanted.yaml").write_text((specs / "wanted.yaml").read_text() + "# edited\n")

    refused = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
    assert refused.returncode == 1
    assert "uncommitted changes" in refused.stderr and "--allow-dirty" in refused.stderr
    assert not Path(state).exists()  # refused before the store was even opened
    plan = run_cli("--specs", str(specs), "--state", state, "--plan", cwd=tmp_path)
    assert plan.returncode == 2 and "(uncommitted changes)" in plan.stdout

    subprocess.run(["git", "checkout", "--", "."], cwd=specs, check=True)
    done = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with open_store(f"sqlite:///{state}").session() as session:
        commits = {e.specs_commit for e in session.scalars(select(Event))}
    assert commits == {head}
    (specs / "wanted.yaml").write_text((specs / "wanted.yaml").read_text() + "# again\n")
    allowed = run_cli("--specs", str(specs), "--state", state, "--apply", "--allow-dirty",
                      cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
