"""Waves into a busy target, on real Postfix + Dovecot and fed (issue 12).

A migration in waves always moves mailboxes into a system that already receives mail for the
earlier waves. Here ten mailboxes move pf1 -> pf2 in two waves of five, then the first five
back, while mail flows the whole time through fed (outside senders) and into both Postfixes
(their local users) for them and for one mailbox that stays on each system: every wave
lands on a target that is receiving mail, the second on one receiving mail for the first,
and the second is run as a real ``reconcile --apply`` killed with SIGKILL at a random step,
then run again. Every acknowledged message is counted by
Message-ID in every real mailbox: found exactly once, in the mailbox its address lives in,
nothing in fed's shunt. Before the fix fed's pooled sessions to the target's Postfix, opened
before its tables changed, answered ``550 5.1.1 User unknown in virtual mailbox table`` after
the flip and fed shunted and bounced the mail.

Also: a system the driver refuses keeps main.cf, master.cf, the maps and Dovecot's files
byte-identical; a change it makes is in the step's event with the command that undoes it;
and a target that refuses the new mailbox is never flipped to.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.engine import ApplyReport, Engine
from reconciler.state.model import Event, Migration

from pfdovecot import MailHost, make_root
from pfworld import WHY_NOT, PfWorld
from waves import (
    Load,
    Sent,
    Stream,
    account,
    collect,
    drain,
    layout_documents,
    longest_hold,
    run_wave,
)
from world import mailbox_message_ids, placement, policy, run_cli

pytestmark = pytest.mark.timeout(300)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"real Postfix + Dovecot unavailable: {WHY_NOT}", allow_module_level=True)

FAILPOINTS = [f"{step}:{where}" for step in ("E2", "E4", "E5", "E9")
              for where in ("after-action", "after-commit")]


@pytest.fixture(scope="module")
def pf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PfWorld]:
    world = PfWorld(tmp_path_factory.mktemp("busy"))
    yield world
    world.stop()


def test_waves_into_a_busy_target_both_ways_with_a_kill(pf: PfWorld, tmp_path: Path) -> None:
    addresses = [f"w{n:02d}@corp.example" for n in range(1, 11)]
    first, second = addresses[:5], addresses[5:]
    # One mailbox that stays on each system: both are live targets from the start.
    anchors = {"stay1@corp.example": "pf1", "stay2@corp.example": "pf2"}
    pol = policy("waves", deleteSource={"after": "0s", "consent": True}, diary=False)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    layout = {**dict.fromkeys(addresses, "pf1"), **anchors}
    run_wave(pf, tmp_path / "specs-0", state, layout, pol)
    failpoint = random.choice(FAILPOINTS)
    print(f"kill -9 at {failpoint}")  # shown on failure: the run to reproduce
    everyone = sorted(layout)
    load = Load(pf.fed_port, {n: h.smtp_port for n, h in pf.hosts.items()},
                lambda: everyone, fed_rate=20, local_rate=10, limit=240).start()
    try:
        # pf2 receives for stay2, then for `first` too; pf1 for stay1 and `second`.
        waves = [(first, "pf2", None), (second, "pf2", failpoint), (first, "pf1", None)]
        for n, (group, target, kill) in enumerate(waves, 1):
            layout.update(dict.fromkeys(group, target))
            run_wave(pf, tmp_path / f"specs-{n}", state, layout, pol, failpoint=kill,
                     log=print)
    finally:
        load.stop()
    engine = pf.engine(tmp_path / f"specs-{len(waves)}", state)
    drain(engine, pf.hosts.values())
    result = account(load.acked, collect(pf.hosts, everyone),
                     lambda rcpt: f"{layout[rcpt]}/{rcpt}")
    print(result.line(longest_hold(engine)))
    assert result.acknowledged > 500 and not load.refused
    assert (result.lost, result.duplicated, result.misplaced) == ([], [], []), result.line(0)
    assert engine.fed.queue().pending == 0
    assert shunted(engine, everyone) == []
    assert not list((Path(engine.specs.fed.state_dir) / "spool" / "shunt").glob("*"))
    for address in addresses:  # every migration finished where the specs say
        assert engine.fed.lookup(address) == physical_address(layout[address],
                                                              mailbox_id_for(address))
    with engine.store.session() as session:
        assert {m.state for m in session.scalars(select(Migration))} == {13}


def rewrite_map(host: MailHost, table: Path, text: str) -> None:
    """An admin's hand in a map: the text, then postmap in place. Postfix notices an
    in-place rewrite only by the .db's mtime in seconds: give it a later second than any
    the driver stamped (it may stamp ahead of the clock), or smtpd keeps the old table."""
    db = Path(f"{table}.db")
    before = db.stat().st_mtime if db.exists() else 0.0
    table.write_text(text)
    subprocess.run(["postmap", "-c", str(host.postfix_dir), f"hash:{table}"], check=True)
    stamp = int(max(before, time.time())) + 2
    os.utime(db, (stamp, stamp))


def shunted(engine: Engine, addresses: list[str]) -> list[str]:
    """fed's shunted deliveries for these addresses (the world's fed is shared)."""
    return [f"{d.rcpt}: {d.detail}" for address in addresses
            for d in engine.fed.deliveries(rcpt=address, limit=10000)
            if d.result == "shunted"]


def file_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every configuration file under `roots` (logs, runtime and mailferry's own
    database left out)."""
    skip = {"mailferry.db", ".lock", "maillog", "dovecot.log", "stderr.log"}
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name not in skip and "run" not in path.parts \
                    and "state" not in path.relative_to(root).parts[:1]:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_a_refused_system_is_left_byte_identical_and_changes_are_recorded(
        pf: PfWorld, tmp_path: Path) -> None:
    host = MailHost("pf3", make_root("mailferry-pf3-"), pf.fed_port)
    try:
        host.write_config()
        conf = host.dovecot_conf.read_text()
        host.dovecot_conf.write_text(conf.replace("0.-_@=\n", "0.-_@\n"))  # no '='
        host.start_dovecot()
        host.start_postfix()
        pf.base.insert(1, host.spec_document())
        try:
            roots = (host.postfix_dir, host.dovecot_conf.parent, host.state_dir)
            before = file_hashes(*roots)
            assert str(host.postfix_dir / "main.cf") in before
            state = f"sqlite:///{tmp_path / 'state.db'}"
            pol = policy("p", deleteSource="never")
            specs = pf.write(tmp_path / "v1", [pol, placement(
                "h", "pf3", [{"address": "zed@corp.example"}], policy_name="p")])
            result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
            assert result.returncode == 1
            assert "pf3: configuration refused: Dovecot's auth_username_chars lacks '='" \
                in result.stdout, result.stdout
            assert file_hashes(*roots) == before  # not one byte changed
            # Fixed by the admin: the driver configures, the event says how, the journal too.
            host.dovecot_conf.write_text(conf)
            host.doveadm("reload")
            # The refused create backs off (the engine's error model); the admin who fixed
            # the cause says so instead of waiting for the retry.
            result = run_cli("--specs", str(specs), "--state", state, "retry",
                             "zed@corp.example", cwd=tmp_path)
            assert result.returncode == 0 and "back-off cleared" in result.stdout, result
            result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
            assert result.returncode == 0, result.stdout
            engine = pf.engine(specs, state)
            with engine.store.session() as session:
                created = session.scalars(select(Event).where(
                    Event.address == "zed@corp.example", Event.step == "create")).one()
            diff = json.loads(created.detail)["config_changes"]["pf3"][0]
            assert f"+relayhost = [127.0.0.1]:{pf.fed_port}" in diff
            assert "+virtual_mailbox_domains = pf3.invalid" in diff
            undo = diff.rsplit("undo: ", 1)[1].strip()
            assert "-X" in undo and "relayhost" in undo and str(host.postfix_dir) in undo
            assert undo in (host.state_dir / "postconf-changes.log").read_text()
            subprocess.run(undo, shell=True, check=True)  # the admin's values are back
            values = subprocess.run(["postconf", "-c", str(host.postfix_dir), "-h",
                                     "relayhost", "virtual_mailbox_domains"], check=True,
                                    capture_output=True, text=True).stdout.split("\n")
            assert values[:2] == ["", "$virtual_mailbox_maps"]  # Postfix's defaults again
        finally:
            pf.base[:] = [d for d in pf.base if d["metadata"]["name"] != "pf3"]
    finally:
        host.stop()


def test_a_target_refusing_the_new_mailbox_is_not_flipped_to(pf: PfWorld,
                                                               tmp_path: Path) -> None:
    """An admin's hand in pf2's tables between E5 and E9: the hold stays, nothing is lost."""
    address = "yan@corp.example"
    box = mailbox_id_for(address)
    pf1, pf2 = pf.hosts["pf1"], pf.hosts["pf2"]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource={"after": "0s", "consent": True}, diary=False)
    run_wave(pf, tmp_path / "v1", state, {address: "pf1"}, pol)
    specs = pf.write(tmp_path / "v2", [pol, placement("m", "pf2", [{"address": address}],
                                                      policy_name="p")])
    engine = pf.engine(specs, state)
    engine.register_systems()
    for _ in range(6):  # up to the hold (state 5)
        engine.run_changes(engine.plan().due(), ApplyReport(), engine.clock(), purge=False)
        with engine.store.session() as session:
            m = session.scalars(select(Migration).where(Migration.address == address)).one()
            if m.state == 5:
                break
    assert m.state == 5
    table = pf2.state_dir / "virtual_mailbox"
    kept = table.read_text()
    rewrite_map(pf2, table, kept.replace(f"{box}@pf2.invalid", f"gone-{box}@pf2.invalid"))
    try:
        acked: list[Sent] = []
        Stream("held", pf.fed_port, lambda: [address], 20, "x@outside.test", acked, [],
               limit=1.0).run()
        report = engine.apply()
        errors = [r.message for r in report.errors]
        assert any("E9" in e and address in e and "User unknown" in e for e in errors), errors
        assert engine.fed.lookup(address) == physical_address("pf1", box)
        assert address in engine.fed.holds()
    finally:
        rewrite_map(pf2, table, kept)
    run_wave(pf, specs, state, {address: "pf2"}, pol)
    drain(engine, pf.hosts.values())
    found = pf2.message_ids(box)
    assert acked and {s.mid: found[s.mid] for s in acked} == {s.mid: 1 for s in acked}
    assert pf1.message_ids(box) == {} and shunted(engine, [address]) == []
    # Later pf2 refuses the flipped mailbox (an admin's hand again): fed defers and alerts,
    # the plan and the migration's events say so, and the mail arrives once it is fixed.
    rewrite_map(pf2, table, kept.replace(f"{box}@pf2.invalid", f"gone-{box}@pf2.invalid"))
    try:
        engine.fed.refresh_system("pf2")  # fed's next session sees the admin's table
        late: list[Sent] = []
        Stream("late", pf.fed_port, lambda: [address], 5, "x@outside.test", late, [],
               limit=1.0).run()
        wait_for_refusal = [r for r in engine.fed.deliveries(rcpt=address)
                            if r.result == "refused"]
        for _ in range(100):
            if wait_for_refusal:
                break
            time.sleep(0.1)
            wait_for_refusal = [r for r in engine.fed.deliveries(rcpt=address)
                                if r.result == "refused"]
        assert wait_for_refusal and "User unknown" in wait_for_refusal[0].detail
        plan = run_cli("--specs", str(specs), "--state", state, "--plan", cwd=tmp_path)
        assert f"{address}: pf2 refuses {box}@pf2.invalid" in plan.stdout, plan.stdout
        engine.apply()
        with engine.store.session() as session:
            event = session.scalars(select(Event).where(Event.address == address,
                                                        Event.step == "refused")).one()
        assert "User unknown" in json.loads(event.detail)["reply"]
        assert shunted(engine, [address]) == []
    finally:
        rewrite_map(pf2, table, kept)
    drain(engine, pf.hosts.values())
    found = pf2.message_ids(box)
    assert late and {s.mid: found[s.mid] for s in late} == {s.mid: 1 for s in late}
    assert shunted(engine, [address]) == []


def embedded_ports(pf: PfWorld) -> dict[str, int]:
    """The embedded systems' submission ports (their local users write there)."""
    return {d["metadata"]["name"]: int(d["spec"]["maildir"]["submission"].rsplit(":", 1)[1])
            for d in pf.base if d["spec"].get("driver") == "maildir"}


def test_waves_into_a_busy_embedded_target(pf: PfWorld, tmp_path: Path) -> None:
    """The same into the embedded maildir system s1, from pf1: it reads its accounts at every
    RCPT, so nothing there goes stale, and the refresh and the probes apply to it as to
    any driver."""
    addresses = [f"e{n}@corp.example" for n in range(1, 5)]
    layout = {**dict.fromkeys(addresses, "pf1"), "stay.e@corp.example": "s1"}
    pol = policy("emb", deleteSource={"after": "0s", "consent": True}, diary=False)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    run_wave(pf, tmp_path / "specs-0", state, layout, pol)
    everyone = sorted(layout)
    ports = {**embedded_ports(pf), "pf1": pf.hosts["pf1"].smtp_port}
    load = Load(pf.fed_port, ports, lambda: everyone, fed_rate=20,
                local_rate=10, limit=120).start()
    try:
        for n, group in enumerate((addresses[:2], addresses[2:]), 1):
            layout.update(dict.fromkeys(group, "s1"))
            run_wave(pf, tmp_path / f"specs-{n}", state, layout, pol)
        deadline = time.monotonic() + 10  # enough mail after the waves too (bounded)
        while len(load.acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        load.stop()
    engine = pf.engine(tmp_path / "specs-2", state)
    drain(engine, pf.hosts.values())
    found = {f"{s}/{a}": mailbox_message_ids(engine, s, a) for s in ("s1", "pf1")
             for a in everyone}
    result = account(load.acked, found, lambda rcpt: f"{layout[rcpt]}/{rcpt}")
    assert not load.refused, load.refused[:3]
    assert result.acknowledged > 100
    assert (result.lost, result.duplicated, result.misplaced) == ([], [], []), result.line(0)
    assert shunted(engine, everyone) == []


def test_an_embedded_target_refusing_the_new_mailbox_is_not_flipped_to(
        pf: PfWorld, tmp_path: Path) -> None:
    address = "emb.gone@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource={"after": "0s", "consent": True}, diary=False)
    run_wave(pf, tmp_path / "v1", state, {address: "pf1"}, pol)
    engine = pf.engine(pf.write(tmp_path / "v2", layout_documents({address: "s1"}, pol)),
                       state)
    engine.register_systems()
    for _ in range(6):  # up to the hold (state 5)
        engine.run_changes(engine.plan().due(), ApplyReport(), engine.clock(), purge=False)
        with engine.store.session() as session:
            m = session.scalars(select(Migration).where(Migration.address == address)).one()
            if m.state == 5:
                break
    assert m.state == 5
    engine.drivers["s1"].delete_mailbox(box)  # BOX2 gone behind mailferry's back
    errors = [r.message for r in engine.apply().errors]
    assert any("E9" in e and "no such mailbox here" in e for e in errors), errors
    assert engine.fed.lookup(address) == physical_address("pf1", box)
    engine.drivers["s1"].create_mailbox(box, access_addresses=(address,))  # fixed
    run_wave(pf, tmp_path / "v2", state, {address: "s1"}, pol)
    assert engine.fed.lookup(address) == physical_address("s1", box)
    assert shunted(engine, [address]) == []
