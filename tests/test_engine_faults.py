"""The reconciler's failure paths, against real servers.

- kill -9 of `reconcile --apply` right after a step acted on the world but before its state
  was recorded (and once right after a commit): the next run converges, nothing is
  duplicated, no hold is left behind, every transition is recorded once;
- mail sent while an address is held is delivered to BOX2 exactly once and never to BOX1;
- every class of bad spec: exit 1, file and line named, state store and systems unchanged;
- a system that is down: the step names the address and the step, the migration waits in
  its state instead of half-applying, and resumes when the system is back.
"""

from __future__ import annotations

import hashlib
import signal
import smtplib
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from maildir_system.store import Store as SystemStore
from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.state.model import Event, Migration

from helpers.waiting import wait_for
from test_engine_modes import seed_source
from world import World, mailbox_message_ids, placement, policy, run_cli

pytestmark = pytest.mark.timeout(300)



def transitions(world: World, state: str, specs: Path, address: str) -> list[tuple[str, int]]:
    engine = world.engine(specs, state)
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        rows = session.scalars(select(Event).where(Event.migration_id == m.id)
                               .order_by(Event.id)).all()
        return [(e.step, e.to_state) for e in rows
                if e.to_state is not None and e.to_state != e.from_state]


FAILPOINTS = ["E2:after-action", "E4:after-action", "E5:after-action", "E9:after-action",
              "E15:after-action", "E41:after-action", "E9:after-commit", "E15:after-commit"]


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_kill_9_between_steps_converges(world: World, tmp_path: Path, failpoint: str) -> None:
    case = failpoint.replace(":", "-").replace("after-", "").lower()
    address = f"kill-{case}@corp.example"
    box = [{"address": address, "aliases": [f"kill-{case}.a@corp.example"]}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p")
    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    engine = world.engine(home, state)
    engine.apply()
    old_ids = seed_source(engine, address)
    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])

    killed = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path,
                     env={"MAILFERRY_FAILPOINT": failpoint})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    again = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    engine = world.engine(moved, state)
    assert engine.plan().pending is False
    found = mailbox_message_ids(engine, "s2", address)
    assert {mid: found[mid] for mid in old_ids} == dict.fromkeys(old_ids, 1)
    assert sum(found.values()) == len(old_ids)  # nothing else, nothing twice
    assert engine.fed.holds() == {}
    assert engine.fed.lookup(address) == physical_address("s2", mailbox_id_for(address))
    path = transitions(world, state, moved, address)
    assert [s for _, s in path] == [0, 1, 4, 5, 6, 7, 8, 10, 13]


def test_mail_sent_while_held_lands_in_box2_once(world: World, tmp_path: Path) -> None:
    address, alias = "held@corp.example", "held.alias@corp.example"
    box = [{"address": address, "aliases": [alias]}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource="never")
    home = world.write(tmp_path / "v1", [pol, placement("home", "s1", box, policy_name="p")])
    world.engine(home, state).apply()
    moved = world.write(tmp_path / "v2", [pol, placement("wave", "s2", box, policy_name="p")])
    engine = world.engine(moved, state)
    engine.register_systems()
    from reconciler.engine import ApplyReport

    for _ in range(10):  # pass by pass until the hold is active (state 5)
        engine.apply_pass(ApplyReport(), chain=False)
        with engine.store.session() as session:
            m = session.scalars(select(Migration).where(Migration.address == address)).first()
            if m is not None and m.state == 5:
                hold_since = m.hold_started_at
                break
    else:
        pytest.fail("the migration never reached state 5")
    assert hold_since is not None

    fed_smtp = engine.specs.fed.smtp
    sent = []
    with smtplib.SMTP(fed_smtp.host, fed_smtp.port, timeout=10) as smtp:
        for n in range(6):
            rcpt = address if n % 2 == 0 else alias
            mid = f"<held{n}@outside.example>"
            smtp.sendmail("x@outside.example", [rcpt],
                          f"Message-ID: {mid}\nSubject: held {n}\n\nwhile held\n")
            sent.append(mid)
    # fed's decision, observed: every one of them parked (a delivery would come first).
    wait_for(lambda: engine.fed.queue().parked >= len(sent), what="the held mail parked")
    assert engine.fed.queue().held >= len(sent)
    s1_journal = SystemStore(engine.specs.systems["s1"].root)
    assert [d for d in s1_journal.deliveries(mailbox_id_for(address), hold_since.timestamp())
            if d.action == "stored"] == []

    engine.apply()
    deadline = time.monotonic() + 15
    while engine.fed.queue().pending and time.monotonic() < deadline:
        time.sleep(0.1)
    found = mailbox_message_ids(engine, "s2", address)
    assert {mid: found[mid] for mid in sent} == dict.fromkeys(sent, 1)
    in_box1 = mailbox_message_ids(engine, "s1", address)
    assert not set(sent) & set(in_box1)
    assert [d for d in s1_journal.deliveries(mailbox_id_for(address), hold_since.timestamp())
            if d.action == "stored"] == []


BAD_SPECS = {
    "yaml-syntax": ("apiVersion: mailferry/v1\nkind: MailboxPlacement\nmetadata:\n  name: x: y\n"
                    "spec: {}\n", 4),
    "schema": ("apiVersion: mailferry/v1\nkind: MailboxPlacement\nmetadata: {name: x}\nspec:\n"
               "  system: s1\n  mailboxes:\n    - address: a@corp.example\n      colour: red\n",
               8),
    "unknown-system": ("apiVersion: mailferry/v1\nkind: MailboxPlacement\nmetadata: {name: x}\n"
                       "spec:\n  system: s9\n  mailboxes:\n    - address: a@corp.example\n", 5),
    "claimed-twice": ("apiVersion: mailferry/v1\nkind: MailboxPlacement\nmetadata: {name: x}\n"
                      "spec:\n  system: s1\n  mailboxes:\n    - address: a@corp.example\n"
                      "    - address: b@corp.example\n      aliases: [a@corp.example]\n", 9),
    "window-backwards": ("apiVersion: mailferry/v1\nkind: MigrationWindow\nmetadata: {name: w}\n"
                         "spec:\n  timeZone: UTC\n  windows:\n    - kind: allow\n"
                         "      start: '2027-01-02T00:00:00Z'\n"
                         "      end: '2027-01-01T00:00:00Z'\n", 9),
}


def _fingerprint(world: World, tmp_path: Path) -> tuple[str, str, str]:
    """State store bytes, fed's directory and s1's account list."""
    state_file = tmp_path / "state.db"
    engine = world.engine(world.base_dir, f"sqlite:///{tmp_path / 'probe.db'}")
    return (hashlib.sha256(state_file.read_bytes()).hexdigest() if state_file.exists() else "",
            repr(sorted(engine.fed.directory().entries.items())),
            repr(sorted(a.mailbox_id for a in engine.drivers["s1"].list_accounts())))


@pytest.mark.parametrize("kind", sorted(BAD_SPECS))
def test_bad_spec_changes_nothing(world: World, tmp_path: Path, kind: str) -> None:
    text, line = BAD_SPECS[kind]
    good = placement("home", "s1", [{"address": f"bad-{kind}@corp.example"}])
    specs = world.write(tmp_path / "specs", [good])
    (specs / "zz-bad.yaml").write_text(text)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    before = _fingerprint(world, tmp_path)
    result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
    assert result.returncode == 1
    assert f"zz-bad.yaml:{line}:" in result.stderr, result.stderr
    assert "nothing applied" in result.stderr
    assert _fingerprint(world, tmp_path) == before
    assert not (tmp_path / "state.db").exists()
    plan = run_cli("--specs", str(specs), "--state", state, "--plan", cwd=tmp_path)
    assert plan.returncode == 1


def test_system_down_waits_with_address_and_step(world: World, tmp_path: Path) -> None:
    address = "down@corp.example"
    box = [{"address": address}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    home = world.write(tmp_path / "v1", [placement("home", "s1", box)])
    world.engine(home, state).apply()
    # The target's specs point at a port where nothing listens: s2 is "down".
    docs = [dict(d) for d in world.base]
    docs[1] = {**docs[1], "spec": {**docs[1]["spec"], "maildir": {
        **docs[1]["spec"]["maildir"], "root": str(tmp_path / "missing-s2"),
        "lmtp": "127.0.0.1:1"}}}
    down_dir = tmp_path / "down"
    down_dir.mkdir()
    import yaml

    (down_dir / "base.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (down_dir / "wanted.yaml").write_text(yaml.safe_dump_all(
        [placement("wave", "s2", box)], sort_keys=False))
    try:
        result = run_cli("--specs", str(down_dir), "--state", state, "--apply", cwd=tmp_path)
    finally:  # the down specs re-registered s2 in fed: point fed back at the real s2
        world.engine(world.base_dir, f"sqlite:///{tmp_path / 'probe.db'}").register_systems()
    assert result.returncode == 1
    assert address in result.stdout and "E2" in result.stdout, result.stdout
    engine = world.engine(home, state)
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.state == 0 and m.failed_reason is None and m.last_error
    assert engine.fed.lookup(address) == physical_address("s1", mailbox_id_for(address))
