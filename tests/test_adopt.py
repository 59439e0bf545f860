"""Adopting the Postfix + Dovecot systems admins already run (`postfixDovecot.adopt: true`).

One module-wide world (`PfWorld` with the hosts of `tests/adminlayouts.py`): fed and the
embedded s1 as processes, and two real systems built with plain files as an admin would:

- ``pa``: layout a, users as full addresses in a Dovecot passwd-file, homes at
  ``mail/DOMAIN/LOCAL``, ``corp.example`` in ``virtual_mailbox_domains``, a ``hash:``
  ``virtual_mailbox_maps`` and a ``hash:`` ``virtual_alias_maps`` (an alias per user, a list);
- ``pb``: layout b, users, domains and aliases in SQLite through Dovecot's ``sql`` driver and
  Postfix's ``sqlite:`` maps (aliases in an ``alias`` table keyed by address and a ``forward``
  table keyed by local part and domain), Maildirs at ``vmail/DOMAIN/LOCAL``.

What is proved, on the real servers: ``adopt --check`` lists what it would add and changes
nothing, and on a system that lacks what it needs lists each blocker with its fix and
changes nothing; ``adopt`` + ``import`` give specs after which ``--plan`` has no changes;
the aliases in pb's SQL tables are imported (their keys read from the database the
map's .cf names, each one decided by Postfix's own answer: an inactive row is not one);
a mailbox in no spec shows as unmanaged; ten users move pa -> pb, and two of pb's with
their SQL aliases pb -> pa, while mail flows through fed and from local senders on both
systems (to the aliases too), counted by Message-ID (lost 0, duplicated 0,
misplaced 0), old mail byte-identical; colleagues who moved are accepted and relayed, not
refused with 550; ``release`` refuses to drop the mailboxes it created unless forced, and
leaves every file the admin wrote byte-identical to adoption day (the SQLite database
included); a malformed import target writes nothing; an alias map whose keys mailferry
cannot read (a join, a malformed .cf) is a warning with its fix, and nothing changes.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.drivers.pfdovecot_adopt import AdoptedPostfixDovecotDriver

from adminlayouts import AdminHost
from helpers import mail
from helpers.waiting import wait_for
from pfdovecot import MailHost, make_root
from pfworld import WHY_NOT, PfWorld
from world import placement, policy, run_cli

pytestmark = pytest.mark.timeout(300)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"real Postfix + Dovecot unavailable: {WHY_NOT}", allow_module_level=True)

USERS_A = tuple(f"u{n:02d}@corp.example" for n in range(1, 21))
MOVING = USERS_A[:10]
USERS_B = ("b01@corp.example", "b02@corp.example", "b03@corp.example")
MOVING_B = USERS_B[:2]  # pb -> pa, with their aliases from pb's SQL tables
ALIASES_B = {"sales@corp.example": "b01@corp.example",
             "desk@corp.example": "b01@corp.example, b02@corp.example"}  # desk: a list
FORWARDS_B = {"help@corp.example": "b02@corp.example"}
ALIAS_OF = {"sales@corp.example": "b01@corp.example", "help@corp.example": "b02@corp.example",
            **{f"info.{u}": u for u in USERS_A}}
LISTS = {"desk@corp.example": MOVING_B}


def hosts(fed_port: int) -> dict[str, MailHost]:
    aliases_a = {f"info.{u}": u for u in USERS_A}
    aliases_a["team@corp.example"] = "u01@corp.example, u02@corp.example"
    return {
        "pa": AdminHost("pa", make_root("mailferry-pa-"), fed_port, layout="passwd",
                        users=USERS_A, aliases=aliases_a),
        "pb": AdminHost("pb", make_root("mailferry-pb-"), fed_port, layout="sql",
                        users=USERS_B, aliases=ALIASES_B, forwards=FORWARDS_B,
                        inactive={"old.b03@corp.example": "b03@corp.example"},
                        extra={"support@corp.example": "b03@corp.example",
                               "unlisted@corp.example": "b03@corp.example"},
                        alias_candidates=("support@corp.example", "nobody@corp.example")),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PfWorld]:
    made = PfWorld(tmp_path_factory.mktemp("adopt"), hosts=hosts)
    yield made
    made.stop()


def admin(world: PfWorld, name: str) -> AdminHost:
    host = world.hosts[name]
    assert isinstance(host, AdminHost)
    return host


def send(port: int, rcpt: str, mid: str, sender: str = "x@outside.example") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail(sender, [rcpt], mail.message(f"to {rcpt}", mid, sender=sender, to=rcpt))


def cli(world: PfWorld, specs: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--specs", str(specs), "--state", str(state), *args, cwd=world.root,
                   timeout=120)


def test_check_on_a_system_that_blocks_changes_nothing(world: PfWorld, tmp_path: Path) -> None:
    """No master user, no overlay passdb/userdb, a map type Postfix cannot read here; and
    alias maps whose keys mailferry cannot list (a malformed .cf): warnings with the fix."""
    bare = AdminHost("pc", make_root("mailferry-pc-"), world.fed_port, layout="passwd",
                     users=("c01@corp.example",), ready=False)
    bare.write_config()  # nothing needs to run: every check before any change is a read
    main_cf = bare.etc / "main.cf"
    main_cf.write_text(main_cf.read_text().replace(
        f"virtual_alias_maps = hash:{bare.etc}/virtual",
        f"virtual_alias_maps = hash:{bare.etc}/virtual, pgsql:{bare.etc}/pgsql-aliases.cf, "
        f"sqlite:{bare.etc}/broken.cf"))
    broken = bare.etc / "broken.cf"
    broken.write_text("dbpath = /nonexistent.sqlite\nresult_format = %s\n")  # no query
    before = bare.admin_files()
    doc = bare.spec_document()
    doc["spec"]["postfixDovecot"]["aliasCandidates"] = str(tmp_path / "missing.txt")
    specs = world.write(tmp_path / "specs", [doc])
    done = cli(world, specs, tmp_path / "state.db", "adopt", "--check", "pc")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "blocks: Dovecot has no master passdb" in out and "fix: add to" in out
    assert f"reads no passdb/userdb from {bare.state_dir}/passwd" in out
    assert "lacks '='" in out
    assert "cannot read pgsql: maps" in out and "postfix-pgsql" in out
    assert "4 blocker(s); nothing changed" in out
    assert (f"~ warns: sqlite:{broken}: mailferry cannot list its keys ({broken}: no query "
            "(and no table/where_field))") in out
    assert f"({bare.etc}/pgsql-aliases.cf: does not exist (local))" in out
    assert out.count("fix: list the aliases' addresses") == 2
    assert (f"~ warns: aliasCandidates {tmp_path}/missing.txt: No such file or directory. "
            "fix: give a readable UTF-8 file") in out
    # adopt itself refuses the same way: nothing recorded, main.cf as the admin wrote it
    done = cli(world, specs, tmp_path / "state.db", "adopt", "pc")
    assert done.returncode == 1 and "adoption refused" in done.stderr
    assert bare.admin_files() == before
    assert not (bare.state_dir / "adoption.json").exists()
    # a .cf Postfix itself cannot parse: postconf is fatal, a blocker naming its line
    broken.write_text("dbpath = /nonexistent.sqlite\nSELECT goto FROM alias\n")
    done = cli(world, specs, tmp_path / "state.db", "adopt", "--check", "pc")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{broken}, line 2: missing '=' after attribute name" in done.stdout
    assert "fix: correct what Postfix names" in done.stdout
    assert "1 blocker(s); nothing changed" in done.stdout
    shutil.rmtree(bare.root, ignore_errors=True)


def test_malformed_import_target_writes_nothing(world: PfWorld, tmp_path: Path) -> None:
    pa = admin(world, "pa")
    owned: dict[str, Any] = {"apiVersion": "mailferry/v1", "kind": "MailSystem",
                             "metadata": {"name": "own"}, "spec": {**pa.spec_document()["spec"]}}
    owned["spec"]["postfixDovecot"] = {**owned["spec"]["postfixDovecot"], "adopt": False,
                                       "stateDir": str(tmp_path / "own")}
    specs = world.write(tmp_path / "specs", [owned])
    state = tmp_path / "state.db"
    done = cli(world, specs, state, "import", "nowhere")
    assert done.returncode == 1 and "no MailSystem named 'nowhere'" in done.stderr
    done = cli(world, specs, state, "import", "own")
    assert done.returncode == 1 and "wanted.yaml:" in done.stderr  # FILE:LINE of the spec
    assert "not adoptable" in done.stderr
    done = cli(world, specs, state, "import", "pa")  # adoptable, not adopted yet
    assert done.returncode == 1 and "reconcile adopt pa" in done.stderr
    assert sorted(p.name for p in specs.iterdir()) == ["base.yaml", "wanted.yaml"]
    assert not (pa.state_dir / "adoption.json").exists()


def message_ids(host: AdminHost, user: str) -> Counter[str]:
    return host.message_ids(user)


def seed(driver: AdoptedPostfixDovecotDriver, box: str, address: str) -> dict[str, bytes]:
    """Old mail in INBOX and Sent of an adopted mailbox; Message-ID -> the exact bytes."""
    sent: dict[str, bytes] = {}
    for n, folder in enumerate(["INBOX", "Sent"]):
        mid = f"<old{n}.{box}@corp.example>"
        data = mail.message(f"old {n}", mid, sender="x@outside.example", to=address,
                            body=f"old mail {n} of {address}\r\nwith a second line")
        driver.append_message(box, folder, data, flags="S", internal_date=1_600_000_000.0 + n)
        sent[mid] = data
    return sent


def stored(driver: Any, box: str) -> dict[str, bytes]:
    """Message-ID -> bytes of every message of a mailbox, read over IMAP."""
    found: dict[str, bytes] = {}
    for folder in driver.list_folders(box):
        for msg in driver.list_messages(box, folder):
            found[msg.message_id or ""] = driver.read_message(box, folder, msg.key)
    return found


def test_adopt_import_move_release(world: PfWorld, tmp_path: Path) -> None:
    pa, pb = admin(world, "pa"), admin(world, "pb")
    fed_port = world.fed_port
    before = {"pa": pa.admin_files(), "pb": pb.admin_files()}
    state = tmp_path / "state.db"
    specs = world.write(tmp_path / "specs", [])
    # -- check, adopt --------------------------------------------------------------------
    done = cli(world, specs, state, "adopt", "--check", "pa")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pa: 20 mailboxes found" in done.stdout
    assert (f"would set virtual_alias_maps = hash:{pa.state_dir}/virtual_alias, "
            f"hash:{pa.etc}/virtual") in done.stdout
    assert "would set virtual_mailbox_domains = corp.example, pa.invalid" in done.stdout
    assert pa.admin_files() == before["pa"]
    for name in ("pa", "pb"):
        done = cli(world, specs, state, "adopt", name)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{name}: adopted; fed knows its" in done.stdout
    # pb's SQL aliases: the keys of both tables, read from the db its .cf files name
    assert f"sqlite:{pb.etc}/sqlite-aliases.cf: 3 key(s) in alias (address)" in done.stdout
    assert (f"sqlite:{pb.etc}/sqlite-forwards.cf: 1 key(s) in forward (local @ domain)"
            in done.stdout)
    # the third map's query is not a plain lookup: a warning with its fix, not a blocker;
    # the aliasCandidates file's addresses are asked of it (unlisted@ is in no list: missed)
    assert (f"~ warns: sqlite:{pb.etc}/sqlite-extra.cf: mailferry cannot list its keys "
            f"({pb.etc}/sqlite-extra.cf: the condition \"lower(address) = lower('%s')\"" in
            done.stdout), done.stdout
    assert "fix: list the aliases' addresses, one a line, in a file and name it in " \
        "postfixDovecot.aliasCandidates" in done.stdout
    main_cf = (pa.etc / "main.cf").read_text()
    assert f"virtual_alias_maps = hash:{pa.state_dir}/virtual_alias, hash:{pa.etc}/virtual" \
        in main_cf
    # -- import: --plan has no changes -----------------------------------------------------
    for name in ("pa", "pb"):
        done = cli(world, specs, state, "import", name)
        assert done.returncode == 0, done.stdout + done.stderr
    imported = yaml.safe_load((specs / "imported-pa.yaml").read_text())
    boxes = imported["spec"]["mailboxes"]
    assert [b["address"] for b in boxes] == list(USERS_A)
    assert boxes[0] == {"address": "u01@corp.example", "aliases": ["info.u01@corp.example"]}
    imported_b = yaml.safe_load((specs / "imported-pb.yaml").read_text())
    boxes_b = imported_b["spec"]["mailboxes"]
    # Postfix decided each key: old.b03 (active = 0) is none, desk@ (two targets) a list;
    # support@ came from aliasCandidates (nobody@ there is in no map: nothing)
    assert boxes_b == [{"address": "b01@corp.example", "aliases": ["sales@corp.example"]},
                       {"address": "b02@corp.example", "aliases": ["help@corp.example"]},
                       {"address": "b03@corp.example", "aliases": ["support@corp.example"]}]
    done = cli(world, specs, state, "--plan")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No changes" in done.stdout and "23 mailboxes" in done.stdout
    assert "unmanaged" not in done.stdout
    done = cli(world, specs, state, "import", "pa")  # again: the file is there
    assert done.returncode == 1 and "exists" in done.stderr
    # -- a mailbox in no spec: unmanaged, never touched ------------------------------------
    partial = dict(imported, spec={**imported["spec"], "mailboxes": boxes[:-1]})
    trimmed = world.write(tmp_path / "trimmed", [partial])
    (trimmed / "imported-pb.yaml").write_text((specs / "imported-pb.yaml").read_text())
    done = cli(world, trimmed, state, "--plan")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "? u20@corp.example" in done.stdout and "unmanaged: in no spec" in done.stdout
    assert done.stdout.rstrip().endswith("1 unmanaged.")
    # -- old mail and mail before the move -------------------------------------------------
    engine = world.engine(specs, f"sqlite:///{state}")
    source = engine.drivers["pa"]
    assert isinstance(source, AdoptedPostfixDovecotDriver)
    old = {u: seed(source, mailbox_id_for(u), u) for u in MOVING}
    old.update({u: seed(engine.drivers["pb"], mailbox_id_for(u), u)  # type: ignore[arg-type]
                for u in MOVING_B})
    for n, user in enumerate(MOVING):
        send(fed_port, user, f"<before{n}@outside.example>")
    send(pa.smtp_port, "team@corp.example", "<team0@corp.example>", "u15@corp.example")
    wait_for(lambda: all(message_ids(pa, u)[f"<before{n}@outside.example>"] == 1
                         for n, u in enumerate(MOVING)), what="mail before the move in BOX1")
    # -- move ten users pa -> pb, and b01, b02 pb -> pa, while mail flows -----------------
    pol = policy("move", deleteSource="never")
    stay = dict(imported, spec={**imported["spec"], "mailboxes": boxes[10:]})
    wave = placement("wave", "pb", boxes[:10], policy_name="move")
    stay_b = dict(imported_b, spec={**imported_b["spec"], "mailboxes": boxes_b[2:]})
    wave_b = placement("wave-b", "pa", boxes_b[:2], policy_name="move")
    moved_specs = world.write(tmp_path / "moved", [pol, stay, wave, stay_b, wave_b])
    engine = world.engine(moved_specs, f"sqlite:///{state}")
    outside = mail.Sender(fed_port, [*MOVING, *(f"info.{u}" for u in MOVING[:3]),
                                     "sales@corp.example", "help@corp.example"],
                          tag="out", count=45, seconds=60, sender="out@corp.example")
    local_a = mail.Sender(pa.smtp_port, [*MOVING, *MOVING_B], tag="loca", count=24,
                          seconds=60, sender="loca@corp.example")
    # pb's users keep mailing each other and the SQL aliases while its overlay changes
    local_b = mail.Sender(pb.smtp_port, [*USERS_B, "sales@corp.example", "help@corp.example",
                                         "desk@corp.example"],
                          tag="locb", count=21, seconds=60, sender="locb@corp.example")
    senders = (outside, local_a, local_b)
    for sender in senders:
        sender.start()
    report = engine.apply()
    for sender in senders:
        sender.join(70)
    assert not any(sender.is_alive() for sender in senders)
    assert not report.errors, [r.message for r in report.errors]
    assert not engine.plan().pending, [c for c in engine.plan().changes
                                       if c.action != "in-sync"]
    assert all(sender.acked_ids for sender in senders)
    assert not [r for sender in senders for r in sender.refused]
    # -- after the move: colleagues who moved are accepted on pa and relayed ---------------
    send(pa.smtp_port, "u01@corp.example", "<after.pa@corp.example>", "u15@corp.example")
    send(pa.smtp_port, "info.u02@corp.example", "<after.alias@corp.example>",
         "u15@corp.example")
    send(pb.smtp_port, "u03@corp.example", "<after.pb@corp.example>", "b01@corp.example")
    # b01's SQL alias on pb, its old system: to the new mailbox on pa, through fed
    send(pb.smtp_port, "sales@corp.example", "<after.sales@corp.example>", "b03@corp.example")
    # pb's local user writes to a colleague still on pa: accepted, relayed through fed
    send(pb.smtp_port, "u15@corp.example", "<to.u15@corp.example>", "b01@corp.example")
    wait_for(lambda: engine.fed.queue().pending == 0, what="fed's queue to drain", timeout=40)
    # Postfix hands the last sends on between its queue runs and its retries (1-5 s here);
    # under CI's load (three suites' servers on two cores) 20 s was once not enough for pb
    pa.assert_queue_empty(60)
    pb.assert_queue_empty(60)
    wait_for(lambda: message_ids(pa, "u15@corp.example")["<to.u15@corp.example>"] == 1,
             what="pb -> fed -> pa for a colleague on pa")
    # -- exact accounting by Message-ID ----------------------------------------------------
    expected: dict[str, Counter[str]] = {u: Counter() for u in (*USERS_A, *USERS_B)}
    for n, user in enumerate(MOVING):
        expected[user].update([*old[user], f"<before{n}@outside.example>"])
    for user in MOVING_B:
        expected[user].update(list(old[user]))
    for rcpt, mid in ((rcpt, mid) for sender in senders
                      for rcpt, mids in sender.acked.items() for mid in mids):
        for user in LISTS.get(rcpt, (ALIAS_OF.get(rcpt, rcpt),)):
            expected[user][mid] += 1
    expected["u01@corp.example"].update(["<team0@corp.example>", "<after.pa@corp.example>"])
    expected["u02@corp.example"].update(["<team0@corp.example>", "<after.alias@corp.example>"])
    expected["u03@corp.example"]["<after.pb@corp.example>"] += 1
    expected["b01@corp.example"]["<after.sales@corp.example>"] += 1
    where = {**{u: (pb, mailbox_id_for(u)) for u in MOVING},
             **{u: (pa, mailbox_id_for(u)) for u in MOVING_B}, USERS_B[2]: (pb, USERS_B[2])}
    lost, duplicated, misplaced = [], [], []
    every = Counter[str]()
    for user, (host, box) in where.items():
        found = message_ids(host, box)
        every.update(found)
        for mid, count in expected[user].items():
            if found[mid] < count:
                lost.append(f"{mid} for {user}")
            elif found[mid] > count:
                duplicated.append(f"{mid} x{found[mid]} for {user}")
        misplaced += [f"{mid} in {user}" for mid in found if mid not in expected[user]]
    assert (lost, duplicated, misplaced) == ([], [], [])
    assert sum(every.values()) == sum(sum(c.values()) for u, c in expected.items()
                                      if u in where)
    # BOX1 got nothing after the flip (E9's redirect and the transport through fed)
    for mid in ("<after.pa@corp.example>", "<after.alias@corp.example>"):
        assert all(message_ids(pa, u)[mid] == 0 for u in MOVING)
    assert message_ids(pb, "b01@corp.example")["<after.sales@corp.example>"] == 0
    # old mail byte-identical on the target
    target = engine.drivers["pb"]
    for user in MOVING:
        box = mailbox_id_for(user)
        copied = stored(target, box)
        assert {mid: copied.get(mid) for mid in old[user]} == old[user]
        assert engine.fed.lookup(user) == physical_address("pb", box)
        assert engine.fed.lookup(f"info.{user}") == physical_address("pb", box)
    for user in MOVING_B:
        box = mailbox_id_for(user)
        copied = stored(engine.drivers["pa"], box)
        assert {mid: copied.get(mid) for mid in old[user]} == old[user]
    for alias, user in (("sales@corp.example", "b01@corp.example"),
                        ("help@corp.example", "b02@corp.example")):
        assert engine.fed.lookup(alias) == physical_address("pa", mailbox_id_for(user))
    # the admin's tables were never rewritten
    assert pa.admin_files() == {**before["pa"], str(pa.etc / "main.cf"):
                                pa.admin_files()[str(pa.etc / "main.cf")]}
    assert pb.admin_files() == {**before["pb"], str(pb.etc / "main.cf"):
                                pb.admin_files()[str(pb.etc / "main.cf")]}
    # -- release ---------------------------------------------------------------------------
    done = cli(world, moved_specs, state, "release", "pb")
    assert done.returncode == 1 and "10 mailbox(es) mailferry created" in done.stderr
    assert "pb.invalid" in (pb.etc / "main.cf").read_text()  # refused: nothing changed
    done = cli(world, moved_specs, state, "release", "pa")
    assert done.returncode == 1 and "2 mailbox(es) mailferry created" in done.stderr
    done = cli(world, moved_specs, state, "release", "pa", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "transport (mailferry's overlay, in flight)" in done.stdout  # the ten redirects
    assert "+++ postconf -n (now)" not in done.stdout  # postconf -n as at adoption
    assert "byte-identical to adoption" in done.stdout
    done = cli(world, moved_specs, state, "release", "pb", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    assert pa.admin_files() == before["pa"]
    assert pb.admin_files() == before["pb"]
    # released: the systems are the admin's again (pa delivers u01 to BOX1 by its own maps)
    send(pa.smtp_port, "u01@corp.example", "<released@corp.example>", "u15@corp.example")
    send(pb.smtp_port, "sales@corp.example", "<released.sales@corp.example>",
         "b03@corp.example")  # and pb's SQL alias by pb's own tables
    wait_for(lambda: message_ids(pa, "u01@corp.example")["<released@corp.example>"] == 1
             and message_ids(pb, "b01@corp.example")["<released.sales@corp.example>"] == 1,
             what="pa's and pb's own deliveries after release")
