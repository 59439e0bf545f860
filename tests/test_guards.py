"""Guard rails in the pure plan, and the destructive path end to end.

- E41 without `deleteSource.consent` is refused (marked destructive, with the reason);
  with it, it is a destructive step; an address that left the specs is never deleted;
- a move back (the last migration finished, the specs now place the address elsewhere) is
  destructive and needs the placement's `allowMoveBack`;
- a new target before the hold is a conflict; after the hold the migration continues as
  recorded and the refused edit is reported;
- a suspended placement takes no step;
- the window-fit estimate warns when the data will not fit.
Then through the CLI with real servers: the deletion refused, then applied with consent.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.fit import WindowLoad, window_fit
from reconciler.plan import MigrationView, make_plan
from reconciler.spec.loader import load_specs
from reconciler.spec.model import DesiredMailbox, PolicySpec, SourceLocation, WindowRule, WindowSpec

from world import World, placement, policy, run_cli

pytestmark = pytest.mark.timeout(120)

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
A = "a@x.example"
DIR = {A: "a=x.example@s2.invalid"}


def _want(system: str = "s2", *, consent: bool = False, move_back: bool = False,
          placement_name: str = "p", window: WindowSpec | None = None) -> DesiredMailbox:
    pol = PolicySpec("pol", delete_source_after=timedelta(0), delete_consent=consent)
    return DesiredMailbox(address=A, aliases=(), system=system, placement=placement_name,
                          window=window, policy=pol, station=None, allow_move_back=move_back)


def _m(state: int, target: str = "s2", **extra: object) -> MigrationView:
    modes = PolicySpec("pol", delete_source_after=timedelta(0)).modes()
    return MigrationView(id=1, address=A, source_system="s1", target_system=target,
                         state=state, state_since=NOW - timedelta(hours=1), modes=modes,
                         placement="p", **extra)  # type: ignore[arg-type]


def test_delete_needs_consent_and_never_on_removal() -> None:
    [refused] = make_plan({A: _want()}, [_m(10)], DIR, NOW).changes
    assert (refused.action, refused.step, refused.destructive) == ("refused", "E41", True)
    assert "deleteSource.consent: true" in refused.reason
    [allowed] = make_plan({A: _want(consent=True)}, [_m(10)], DIR, NOW).changes
    assert (allowed.action, allowed.step, allowed.destructive) == ("step", "E41", True)
    plan = make_plan({}, [_m(10)], DIR, NOW)
    assert plan.changes[0].action == "in-sync" and "kept" in plan.changes[0].reason
    assert plan.due() == []


def test_move_back_is_destructive_and_needs_consent() -> None:
    back = {A: _want("s1")}
    [refused] = make_plan(back, [_m(13)], DIR, NOW).changes
    assert (refused.action, refused.destructive) == ("refused", True)
    assert "allowMoveBack: true" in refused.reason
    [move] = make_plan({A: _want("s1", move_back=True)}, [_m(13)], DIR, NOW).changes
    assert (move.action, move.step, move.destructive) == ("migrate", "E1", True)
    assert (move.source, move.target) == ("s2", "s1")
    # Purged records still count: a purged finished migration is history, not oblivion.
    [purged] = make_plan(back, [_m(13, purged=True)], DIR, NOW).changes
    assert purged.action == "refused"
    assert make_plan({}, [_m(13, purged=True)], DIR, NOW).changes == []


def test_new_target_before_and_after_the_hold() -> None:
    elsewhere = {A: _want("s3")}
    [before] = make_plan(elsewhere, [_m(3)], {A: "a=x.example@s1.invalid"}, NOW).changes
    assert before.action == "conflict" and "in progress" in before.reason
    [after] = make_plan(elsewhere, [_m(5)], DIR, NOW).changes
    assert (after.action, after.step, after.target) == ("step", "E9", "s2")
    assert "refused, the hold began (state 5)" in after.refused
    assert after.due_at(NOW)


def test_suspended_placement_takes_no_step() -> None:
    plan = make_plan({A: _want(consent=True)}, [_m(4)], DIR, NOW, frozenset({"p"}))
    [change] = plan.changes
    assert change.action == "suspended" and change.step == "E5" and plan.due() == []
    new = make_plan({A: _want()}, [], {A: "a=x.example@s1.invalid"}, NOW, frozenset({"p"}))
    assert new.changes[0].action == "suspended"


def _friday() -> WindowSpec:
    return WindowSpec("friday", "UTC", (WindowRule(
        "allow", start=NOW + timedelta(days=1), end=NOW + timedelta(days=1, hours=4)),),
        SourceLocation("w.yaml", 1))


def test_window_fit() -> None:
    window = _friday()
    big = WindowLoad(mailboxes=100, measured_bytes=10**12, measured=90, unknown=10)
    text = window_fit(window, NOW, big, (40e6, 0.0))
    assert text is not None and "will not fit" in text and "friday" in text
    assert "10 of them counted at the mean size" in text
    small = WindowLoad(mailboxes=2, measured_bytes=10**6, measured=2)
    assert window_fit(window, NOW, small, (40e6, 500.0)) is None
    assert window_fit(window, NOW, big, None) is None  # nothing measured: no guess
    assert window_fit(window, NOW, big, (0.0, 0.0)) is None


def test_window_fit_uses_the_movers_estimate_from_recorded_runs(tmp_path: Path) -> None:
    from reconciler.mover.manifest import (
        Manifest,
        RunFigures,
        estimate_seconds,
        seconds_for,
        throughput,
    )
    from reconciler.state.store import Store, default_url

    store = Store(default_url(tmp_path / "state.db"))
    manifest = Manifest(store)
    with store.session() as session:
        assert throughput(session) is None and estimate_seconds(session, 10, 10) is None

    def run(copied: int, size: int, seconds: float) -> RunFigures:
        return RunFigures("m", "copy", copied, 0, 0, 0, size, copied, size, seconds, True, {})

    # 20 MB/s but only 100 messages/s: small messages are bound by round trips
    manifest.record_run(run(1000, 200_000_000, 10.0))
    manifest.record_run(run(1000, 200_000_000, 10.0))
    manifest.record_run(run(0, 0, 0.5))  # a no-op re-run says nothing about the rate
    with store.session() as session:
        rates = throughput(session)
        assert rates == (20e6, 100.0)
        # 2 M messages of 1 kB: 100 s of bytes, 20 000 s (5h33m) of messages
        assert estimate_seconds(session, 2_000_000, 2 * 10**9) == 20_000.0
    assert seconds_for(rates, 2_000_000, 2 * 10**9) == 20_000.0
    # 2 GB in 4 hours fits by bytes (100 s), not by messages: the window warns
    load = WindowLoad(mailboxes=40, measured_bytes=2 * 10**9, measured=40,
                      measured_messages=1_500_000, counted=30)
    assert load.estimated_messages == 2_000_000  # 10 mailboxes counted at the mean
    text = window_fit(_friday(), NOW, load, rates)
    assert text is not None and "5h33m" in text and "100 messages/s" in text
    few = WindowLoad(mailboxes=40, measured_bytes=2 * 10**9, measured=40,
                     measured_messages=40_000, counted=40)
    assert window_fit(_friday(), NOW, few, rates) is None  # 400 s: fits


def test_consent_fields_load(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    w = World.__new__(World)  # only the document helpers, no servers
    from world import base_documents

    w.base = base_documents(tmp_path)
    w.write(root, [policy("ok"), policy("no", deleteSource={"after": "1d"}),
                   {**placement("wave", "s2", [{"address": "c@corp.example"}], policy_name="ok"),
                    "spec": {"system": "s2", "policy": "ok", "allowMoveBack": True,
                             "reportTo": ["ops@corp.example"],
                             "mailboxes": [{"address": "c@corp.example"}]}}])
    specs = load_specs(root)
    assert specs.policies["ok"].delete_consent and not specs.policies["no"].delete_consent
    assert specs.placements["wave"].allow_move_back
    assert specs.placements["wave"].report_to == ("ops@corp.example",)
    assert specs.desired()["c@corp.example"].allow_move_back
    assert len(specs.digest) == 64


def test_destructive_refused_then_applied_with_consent(world: World, tmp_path: Path) -> None:
    address = "consent@corp.example"
    box = [{"address": address}]
    state = str(tmp_path / "state.db")
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    assert run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path).returncode == 0

    nope = policy("p", deleteSource={"after": "0s"})
    moved = world.write(tmp_path / "v2", [nope, placement("wave", "s2", box, policy_name="p")])
    applied = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "applied E40" in applied.stdout and "E41" not in applied.stdout.split("blocked")[0]
    assert f"blocked E41      {address}: refused" in applied.stdout
    plan = run_cli("--specs", str(moved), "--state", state, "--plan", "--json", cwd=tmp_path)
    assert plan.returncode == 2
    [change] = [json.loads(line) for line in plan.stdout.splitlines()
                if json.loads(line)["type"] == "change"]
    assert (change["action"], change["step"], change["destructive"]) == ("refused", "E41", True)
    assert "consent" in change["reason"]

    yes = policy("p", deleteSource={"after": "0s", "consent": True})
    moved = world.write(tmp_path / "v2", [yes, placement("wave", "s2", box, policy_name="p")])
    text = run_cli("--specs", str(moved), "--state", state, "--plan", cwd=tmp_path)
    assert "- " + address in text.stdout and "[destructive]" in text.stdout
    done = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert done.returncode == 0 and "applied E41-E42" in done.stdout, done.stdout


def test_move_back_refused_then_applied_with_consent(world: World, tmp_path: Path) -> None:
    address = "moveback@corp.example"
    box = [{"address": address}]
    state = str(tmp_path / "state.db")
    keep = policy("keep", deleteSource="never")
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    run_cli("--specs", str(home), "--state", state, "--apply", cwd=tmp_path)
    moved = world.write(tmp_path / "v2", [keep, placement("wave", "s2", box, policy_name="keep")])
    assert run_cli("--specs", str(moved), "--state", state, "--apply",
                   cwd=tmp_path).returncode == 0

    back = world.write(tmp_path / "v3", [keep, placement("home", "s1", box, policy_name="keep")])
    refused = run_cli("--specs", str(back), "--state", state, "--plan", cwd=tmp_path)
    assert refused.returncode == 2
    assert f"! {address}" in refused.stdout and "allowMoveBack: true" in refused.stdout
    assert "[destructive]" in refused.stdout
    nothing = run_cli("--specs", str(back), "--state", state, "--apply", cwd=tmp_path)
    assert "  applied " not in nothing.stdout

    allowed = placement("home", "s1", box, policy_name="keep")
    allowed["spec"]["allowMoveBack"] = True
    back = world.write(tmp_path / "v3", [keep, allowed])
    plan = run_cli("--specs", str(back), "--state", state, "--plan", cwd=tmp_path)
    assert "- " + address in plan.stdout and "move back" in plan.stdout
    done = run_cli("--specs", str(back), "--state", state, "--apply", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "applied E9" in done.stdout and "applied E40" in done.stdout
    engine = world.engine(back, f"sqlite:///{state}")
    assert engine.plan().pending is False
    assert (engine.fed.lookup(address) or "").endswith("@s1.invalid")
