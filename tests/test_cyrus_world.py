"""Whole migrations between Cyrus IMAP and Postfix + Dovecot, with mail flowing through fed.

The world: fed and the embedded systems as processes (`tests/world.py`), a private Postfix
+ Dovecot `pf1` and `pf2` (`tests/pfdovecot.py`) and a private Cyrus `cy` (`tests/cyrus.py`) run
through the generic IMAP driver with the Cyrus admin (authorization-id logins) and fed
delivering to Cyrus's lmtpd. Cyrus keeps its default `munge8bit: yes`, so the policy that
moves mail into it accepts that rewrite (`acceptStoreRewrites`), and the copy is proven
"equivalent", checked exactly. Every count is by Message-ID, exact: the old mail, the mail
delivered before the move, and every message fed acknowledged while the engine ran.

Cyrus here uses `unixhierarchysep: yes` ('/' separator), since the physical addresses fed
delivers to carry the mailbox id (`alice=corp.example@cy.invalid`) and Cyrus user names can
then contain '.'; the '.' separator and the `INBOX.` namespace are covered in
tests/test_mover_cyrus.py.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_postfix_dovecot import state_of

from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import ApplyReport, Engine

import cyrus
from helpers import mail
from helpers.waiting import wait_for
from pfdovecot import MailHost, make_root, missing_prerequisites
from world import World, base_documents, placement, policy

pytestmark = pytest.mark.timeout(300)
USERS = ("alice", "bob", "carol")
EIGHT_BIT = "J\u00fcrgen M\u00fcller <jm@example.org>"


class CyrusWorld(World):
    """fed + embedded systems + Postfix/Dovecot pf1 and pf2 + Cyrus cy."""

    def __init__(self, root: Path) -> None:
        why = missing_prerequisites() or cyrus.available()
        if why:
            if os.environ.get("CI"):
                raise RuntimeError(f"Cyrus world unavailable: {why}")
            pytest.skip(why)
        self.root = root
        docs = base_documents(root)
        fed_port = int(docs[2]["spec"]["smtp"].rsplit(":", 1)[1])
        self.pf1 = MailHost("pf1", make_root("mailferry-cypf1-"), fed_port)
        # a second Postfix + Dovecot as the Cyrus -> Dovecot target: fed keeps its SMTP
        # connection to a Postfix open, and that smtpd answers from the virtual mailbox
        # table it opened with (550 5.1.1 for a mailbox created since): reported, not ours
        self.pf2 = MailHost("pf2", make_root("mailferry-cypf2-"), fed_port)
        self.cyrus_root = cyrus.private_root()
        self.cy = cyrus.Cyrus(self.cyrus_root, "cy",
                              {mailbox_id_for(f"{u}@corp.example"): f"pw-{u}" for u in USERS},
                              unixhierarchysep=True)
        secret = root / "cyrus-admin.password"
        secret.write_text(self.cy.admin[1] + "\n")
        cy_doc = {"apiVersion": "mailferry/v1", "kind": "MailSystem", "metadata": {"name": "cy"},
                  "spec": {"driver": "imap", "domains": ["corp.example"], "imap": {
                      "server": f"127.0.0.1:{self.cy.port}", "tls": "none", "login": "master",
                      "masterUser": {"user": self.cy.admin[0],
                                     "password": {"file": str(secret)}},
                      "loginFormat": "{local}={domain}", "stateDir": str(root / "cy"),
                      "lmtp": f"127.0.0.1:{self.cy.lmtp_port}"}}}
        self.base = [docs[0], self.pf1.spec_document(), self.pf2.spec_document(), cy_doc,
                     docs[2], docs[3]]
        self.base_dir = root / "base-specs"
        self.write(self.base_dir, [])
        self.embedded = self.start_servers(keep=frozenset({fed_port}))
        try:
            self.pf1.start()
            self.pf2.start()
            self.cy.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.cy.stop()
        self.pf1.stop()
        self.pf2.stop()
        self.embedded.stop()
        shutil.rmtree(self.pf1.root, ignore_errors=True)
        shutil.rmtree(self.pf2.root, ignore_errors=True)
        shutil.rmtree(self.cyrus_root, ignore_errors=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CyrusWorld]:
    w = CyrusWorld(tmp_path_factory.mktemp("cyworld"))
    yield w
    w.stop()


def message(mid: str, to: str, n: int = 0, *, eight_bit: bool = False) -> bytes:
    sender = EIGHT_BIT if eight_bit else "x@outside.example"
    return mail.message(f"m {n}", mid, "body \u00e9", sender=sender, to=to)


def send(port: int, rcpt: str, mid: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("x@outside.example", [rcpt], message(mid, rcpt))


def drive(engine: Engine, address: str, passes: int = 40) -> None:
    engine.register_systems()
    for _ in range(passes):  # bounded
        engine.apply_pass(ApplyReport())
        if not engine.plan().pending:
            return
    pytest.fail(f"{address} still pending after {passes} passes "
                f"(state {state_of(engine, address)}): {engine.plan().changes}")


def ids_in(engine: Engine, system: str, box: str) -> Counter[str]:
    driver = engine.drivers[system]
    found: Counter[str] = Counter()
    for folder in driver.list_folders(box):
        for msg in driver.list_messages(box, folder):
            found[msg.message_id or msg.sha256] += 1
    return found


def seed(engine: Engine, system: str, box: str, address: str) -> list[str]:
    """Old mail in INBOX and Sent with flags and old dates, one with 8-bit headers."""
    ids = []
    for n, folder in enumerate(["INBOX", "INBOX", "Sent", "Sent"]):
        mid = f"<old{n}.{box}@corp.example>"
        engine.drivers[system].append_message(
            box, folder, message(mid, address, n, eight_bit=n == 0), flags="S",
            internal_date=1_000_000_000.0 + n)
        ids.append(mid)
    return ids


def migrate(world: CyrusWorld, tmp_path: Path, user: str, source: str, target: str,
            pol: dict[str, Any]) -> tuple[Engine, list[str]]:
    """Place `user` on `source`, give it old mail and one delivered message, move it to
    `target` while a sender writes to fed; every expected Message-ID."""
    address = f"{user}@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    boxes = [{"address": address}]
    engine = world.engine(world.write(tmp_path / "v1", [pol, placement(
        "home", source, boxes, policy_name="p")]), state)
    assert not engine.apply().errors
    old = seed(engine, source, box, address)
    fed_port = engine.specs.fed.smtp.port
    send(fed_port, address, f"<before.{user}@outside.example>")
    wait_for(lambda: ids_in(engine, source, box)[f"<before.{user}@outside.example>"] == 1,
             timeout=30, what=f"the first mail in BOX1 on {source}")
    engine = world.engine(world.write(tmp_path / "v2", [pol, placement(
        "wave", target, boxes, policy_name="p")]), state)
    sender = mail.Sender(fed_port, [address], tag=f"live.{user}.", count=20, body="body \u00e9")
    sender.start()
    drive(engine, address)
    sender.join(40)
    assert not sender.is_alive() and sender.acked_ids and not sender.refused
    assert state_of(engine, address) == 13
    wait_for(lambda: engine.fed.queue().pending == 0, timeout=30,
             what="fed's queue to drain")
    return engine, [*old, f"<before.{user}@outside.example>", *sender.acked_ids]


def test_dovecot_to_cyrus_with_mail_flowing_through_fed(
        world: CyrusWorld, tmp_path: Path) -> None:
    pol = policy("p", diary=False,
                 acceptStoreRewrites=[{"system": "cy", "rewrite": "8bit-headers-as-x"}])
    engine, expected = migrate(world, tmp_path, "alice", "pf1", "cy", pol)
    box = mailbox_id_for("alice@corp.example")
    wait_for(lambda: sum(ids_in(engine, "cy", box).values()) >= len(expected),
             timeout=30, what="every message in BOX2 on Cyrus")
    found = ids_in(engine, "cy", box)
    assert {mid: found[mid] for mid in expected} == dict.fromkeys(expected, 1)
    assert sum(found.values()) == len(expected)  # nothing else, nothing twice
    assert world.pf1.message_ids(box) == {}  # BOX1 deleted by E41 on the proof
    # the one old message with 8-bit headers was proven equivalent, not byte-identical
    stored = [engine.drivers["cy"].read_message(box, f, m.key)
              for f in engine.drivers["cy"].list_folders(box)
              for m in engine.drivers["cy"].list_messages(box, f)]
    assert any(b"From: JXXrgen MXXller" in data for data in stored)


def test_cyrus_to_dovecot_with_mail_flowing_through_fed(
        world: CyrusWorld, tmp_path: Path) -> None:
    pol = policy("p", diary=False)
    engine, expected = migrate(world, tmp_path, "bob", "cy", "pf2", pol)
    box = mailbox_id_for("bob@corp.example")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(world.pf2.message_ids(box).values()) < len(
            expected):
        time.sleep(0.1)
    found = world.pf2.message_ids(box)
    missing = [mid for mid in expected if not found[mid]]
    in_cyrus = ids_in(engine, "cy", box)
    assert not missing, (f"missing in BOX2: {missing}; in BOX1 on Cyrus: "
                         f"{[m for m in missing if in_cyrus[m]]}; fed: {engine.fed.queue()}")
    assert {mid: found[mid] for mid in expected} == dict.fromkeys(expected, 1)
    assert sum(found.values()) == len(expected)
    # the generic IMAP driver deletes nothing on a server it does not administer
    old = ids_in(engine, "cy", box)
    assert all(old[mid] == 1 for mid in expected[:5])


def test_an_altering_target_makes_the_migration_wait_with_the_reason_in_the_plan(
        world: CyrusWorld, tmp_path: Path) -> None:
    """Without the policy's acceptance: E15 is not verified, the plan shows why (target,
    count, example, the two fixes) and when it looks again, BOX1 stays, nothing is copied
    twice by the retries."""
    address = "carol@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", diary=False)
    boxes = [{"address": address}]
    engine = world.engine(world.write(tmp_path / "v1", [pol, placement(
        "home", "pf1", boxes, policy_name="p")]), state)
    assert not engine.apply().errors
    old = seed(engine, "pf1", box, address)
    engine = world.engine(world.write(tmp_path / "v2", [pol, placement(
        "wave", "cy", boxes, policy_name="p")]), state)
    engine.register_systems()
    reason = ""
    for _ in range(20):  # bounded: until the plan says why it waits
        engine.apply_pass(ApplyReport())
        change = next(c for c in engine.plan().changes if c.address == address)
        if "altered" in change.reason:
            reason = change.reason
            break
    assert reason, "the plan never said why the copy waits"
    assert "target cy altered 1 messages on store: 8-bit header bytes replaced" in reason
    assert "JXXrgen" in reason and "munge8bit: no" in reason
    assert "acceptStoreRewrites" in reason
    assert change.due is not None and state_of(engine, address) == 7  # waits in E15
    engine.apply_pass(ApplyReport())  # not due yet: nothing runs, nothing copied twice
    assert ids_in(engine, "cy", box) == Counter(dict.fromkeys(old, 1))
    assert world.pf1.message_ids(box) == Counter(dict.fromkeys(old, 1))  # BOX1 intact
