"""The Postfix + Dovecot driver and the generic IMAP driver, against real servers.

One module-wide world: fed and the embedded `s1` as processes (as everywhere), plus two
private Postfix + Dovecot systems `pf1` and `pf2` (`tests/pfdovecot.py`) on 127.0.0.1. Every
count is read from the real Maildirs with doveadm, every redirect is observed by sending real
mail to the real Postfix. What is proved here:

- the driver writes the Dovecot passwd-file and the Postfix maps, sets the shared-domain
  routing in main.cf itself, and refuses a main.cf that would answer 550 for its domains;
- a full migration pf1 -> pf2 with mail flowing through fed during the cutover: every message
  in BOX2 exactly once; the E2 redirect (BOX2 -> BOX1) and the E9 redirect (BOX1 -> BOX2)
  happen on the real servers for local users; a source-local user writing to the moved
  colleague reaches BOX2, before E41 (redirect) and after it (shared domain -> fed);
- pf1 -> embedded s1 -> pf1 through every step;
- bad credentials and a stopped Dovecot: a clear error with the address and the step, the
  migration waits in its state, and finishes once fixed;
- a foreign IMAP server as a source (per-user passwords and master login).
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from reconciler.drivers.base import Contact, mailbox_id_for, physical_address
from reconciler.drivers.imap import ImapDriver
from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver
from reconciler.engine import ApplyReport, Engine
from reconciler.errors import TemporaryError
from reconciler.mover.service import mover_loop
from reconciler.spec.model import Endpoint, ImapOptions, MasterUser, SecretRef
from reconciler.state.model import Event, Migration

from helpers import mail
from helpers.waiting import wait_for
from pfdovecot import MailHost, make_root
from pfworld import WHY_NOT, PfWorld
from world import placement, policy, run_cli

pytestmark = pytest.mark.timeout(240)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"real Postfix + Dovecot unavailable: {WHY_NOT}", allow_module_level=True)


@pytest.fixture(scope="module")
def pf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PfWorld]:
    world = PfWorld(tmp_path_factory.mktemp("pfworld"))
    yield world
    world.stop()


def message(mid: str, to: str, n: int = 0) -> bytes:
    return mail.message(f"m {n}", mid, sender="x@outside.example", to=to)


def send(port: int, rcpt: str, mid: str, sender: str = "x@outside.example") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail(sender, [rcpt], message(mid, rcpt))


def state_of(engine: Engine, address: str) -> int | None:
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).first()
        return None if m is None else m.state


def drive(engine: Engine, address: str, on_state: dict[int, Any], *, passes: int = 40) -> None:
    """Pass by pass until nothing is pending; run `on_state[s]` once when state s is first seen."""
    engine.register_systems()
    seen: set[int] = set()
    for _ in range(passes):  # bounded
        engine.apply_pass(ApplyReport(), chain=False)
        state = state_of(engine, address)
        for s, check in on_state.items():
            if state is not None and state >= s and s not in seen:
                seen.add(s)
                check()
        if not engine.plan().pending:
            return
    pytest.fail(f"{address} still pending after {passes} passes (state {state})")


def seed(driver: Any, box: str, address: str) -> list[str]:
    """Old mail in INBOX and Sent, with flags and old dates."""
    ids = []
    for n, folder in enumerate(["INBOX", "INBOX", "Sent"]):
        mid = f"<old{n}.{box}@corp.example>"
        driver.append_message(box, folder, message(mid, address, n), flags="S",
                              internal_date=1_600_000_000.0 + n)
        ids.append(mid)
    return ids


def test_driver_tables_config_and_shared_domain_check(pf: PfWorld, tmp_path: Path) -> None:
    host = pf.hosts["pf1"]
    engine = pf.engine(pf.base_dir, f"sqlite:///{tmp_path / 'state.db'}")
    driver = engine.drivers["pf1"]
    assert isinstance(driver, PostfixDovecotDriver)
    driver.ping()  # sets the routing parameters in main.cf and reloads Postfix
    main_cf = (host.postfix_dir / "main.cf").read_text()
    assert f"relayhost = [127.0.0.1]:{engine.specs.fed.smtp.port}" in main_cf
    assert "virtual_mailbox_domains = pf1.invalid" in main_cf
    box = "tab=corp.example"
    account = driver.create_mailbox(box, internal_address="tab@pf1.internal",
                                    access_addresses=("tab@corp.example",))
    assert account.physical_address == "tab=corp.example@pf1.invalid"
    driver.set_addresses(box, ("tab@corp.example",), ("tab.alias@corp.example",))
    driver.set_redirect(box, "tab=corp.example@pf2.invalid")
    aliases = (host.state_dir / "virtual_alias").read_text()
    assert "tab.alias@corp.example\ttab=corp.example@pf1.invalid" in aliases
    assert "tab=corp.example@pf1.invalid\ttab=corp.example@pf2.invalid" in aliases
    assert (host.state_dir / "virtual_alias.db").exists()
    passwd = (host.state_dir / "passwd").read_text()
    assert passwd.startswith(f"{box}:{{CRYPT}}!:")
    driver.set_redirect(box, None)
    driver.set_syncfed(box, True)
    driver.put_contact(Contact("tab@corp.example", ("tab.alias@corp.example",)))
    driver.apply_address_book({"tab@corp.example": "tab=corp.example@pf1.invalid"})
    again = pf.engine(pf.base_dir, f"sqlite:///{tmp_path / 'state.db'}").drivers["pf1"]
    got = again.get_account(box)
    assert got is not None and got.syncfed and got.redirect_to is None
    assert got.all_addresses == ("tab@corp.example", "tab.alias@corp.example")
    assert again.list_contacts() == [Contact("tab@corp.example", ("tab.alias@corp.example",))]
    assert again.address_book() == {"tab@corp.example": "tab=corp.example@pf1.invalid"}
    # A locked account: no plain IMAP login, whatever the password; the master user reads it.
    conn = imaplib.IMAP4("127.0.0.1", host.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        conn.login(box, "!")
    conn.logout()
    assert again.list_folders(box) == ["INBOX"]
    driver.delete_mailbox(box)
    assert driver.get_account(box) is None
    assert box not in (host.state_dir / "passwd").read_text()
    # A main.cf that lists a shared domain in a local class is refused with the reason.
    assert isinstance(again, PostfixDovecotDriver)
    subprocess.run(["postconf", "-c", str(host.postfix_dir), "-e", "mydestination=corp.example"],
                   check=True)
    try:
        assert any("mydestination lists corp.example" in p for p in again.check_config())
        fresh = pf.engine(pf.base_dir, f"sqlite:///{tmp_path / 's2.db'}").drivers["pf1"]
        with pytest.raises(TemporaryError, match=r"mydestination lists corp\.example"):
            fresh.ping()
    finally:
        subprocess.run(["postconf", "-c", str(host.postfix_dir), "-e", "mydestination="],
                       check=True)


def test_full_migration_pf1_to_pf2_with_mail_flowing(pf: PfWorld, tmp_path: Path) -> None:
    pf1, pf2 = pf.hosts["pf1"], pf.hosts["pf2"]
    address, alias, colleague = "alice@corp.example", "alice.a@corp.example", "bob@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource={"after": "0s", "consent": True})
    boxes = [{"address": address, "aliases": [alias]}]
    home = pf.write(tmp_path / "v1", [pol, placement("home", "pf1", boxes, policy_name="p"),
                                      placement("stay", "pf1", [{"address": colleague}])])
    engine = pf.engine(home, state)
    engine.apply()
    old_ids = seed(engine.drivers["pf1"], box, address)
    fed_port = engine.specs.fed.smtp.port
    send(fed_port, address, "<before@outside.example>")
    wait_for(lambda: pf1.message_ids(box)["<before@outside.example>"] == 1, what="first mail")

    moved = pf.write(tmp_path / "v2", [pol, placement("wave", "pf2", boxes, policy_name="p"),
                                       placement("stay", "pf1", [{"address": colleague}])])
    engine = pf.engine(moved, state)
    probes: dict[str, str] = {}

    def at_state_1() -> None:  # E2 redirect BOX2 -> BOX1 on pf2, for pf2's own local users
        send(pf2.smtp_port, "alice@pf2.internal", "<ad2@pf2.example>", "carol@corp.example")
        wait_for(lambda: pf1.message_ids(box)["<ad2@pf2.example>"] == 1, what="AD2 -> BOX1")
        probes["ad2"] = "<ad2@pf2.example>"

    def at_state_4() -> None:  # pf2 knows AD1 now, but its local users' mail goes via fed
        send(pf2.smtp_port, address, "<carol4@pf2.example>", "carol@corp.example")
        wait_for(lambda: pf1.message_ids(box)["<carol4@pf2.example>"] == 1,
                 what="pf2's local mail for AD1 routed by fed to BOX1 before the flip")
        assert pf2.message_ids(box)["<carol4@pf2.example>"] == 0
        probes["carol4"] = "<carol4@pf2.example>"

    def at_state_5() -> None:  # held: pf1's local user's mail for AD1 must wait in fed too
        send(pf1.smtp_port, address, "<bob0@corp.example>", colleague)
        assert pf1.wait_queue_empty(), "pf1 did not hand bob0 on"
        assert pf1.message_ids(box)["<bob0@corp.example>"] == 0, "stored in BOX1 past the hold"
        assert f"to=<{address}>, relay=127.0.0.1[127.0.0.1]:{fed_port}" in pf1.maillog()
        probes["bob0"] = "<bob0@corp.example>"

    def at_state_6() -> None:  # E9 redirect BOX1 -> BOX2 on pf1, for pf1's local user bob
        send(pf1.smtp_port, address, "<bob1@corp.example>", colleague)
        wait_for(lambda: pf2.message_ids(box)["<bob1@corp.example>"] == 1, what="BOX1 -> BOX2")
        assert pf1.message_ids(box)["<bob1@corp.example>"] == 0
        probes["bob1"] = "<bob1@corp.example>"

    sender = mail.Sender(fed_port, [address, alias])
    started = time.monotonic()
    reused_before = mover_loop().pool.reused
    sender.start()
    drive(engine, address, {1: at_state_1, 4: at_state_4, 5: at_state_5, 6: at_state_6})
    # E15's delta ran on both sessions E11-E14 logged in (one pool per process), not on new
    # logins.
    assert mover_loop().pool.reused - reused_before >= 2
    sender.join(40)
    assert not sender.is_alive()
    assert state_of(engine, address) == 13
    # After E41 pf1 has no alias for alice: its local user's mail goes to fed, then BOX2.
    send(pf1.smtp_port, address, "<bob2@corp.example>", colleague)
    wait_for(lambda: engine.fed.queue().pending == 0, what="fed's queue to drain")
    wait_for(lambda: pf2.message_ids(box)["<bob2@corp.example>"] == 1, what="bob2 in BOX2")
    pf1.assert_queue_empty()
    pf2.assert_queue_empty()
    assert f"to=<{address}>, relay=127.0.0.1[127.0.0.1]:{fed_port}" in pf1.maillog()

    found = pf2.message_ids(box)
    expected = [*old_ids, "<before@outside.example>", *sender.acked_ids, *probes.values(),
                "<bob2@corp.example>"]
    assert sender.acked_ids and not sender.refused
    assert {mid: found[mid] for mid in expected} == dict.fromkeys(expected, 1), \
        f"lost or duplicated after {time.monotonic() - started:.1f} s"
    assert sum(found.values()) == len(expected)  # nothing unexpected either
    assert pf1.message_ids(box) == {}  # BOX1 deleted (E41)
    assert not (pf1.root / "mail" / box).exists()
    assert engine.fed.lookup(address) == physical_address("pf2", box)
    assert engine.fed.lookup(alias) == physical_address("pf2", box)
    assert engine.drivers["pf2"].address_book()[address] == physical_address("pf2", box)
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        steps = [e.step for e in session.scalars(select(Event).where(
            Event.migration_id == m.id).order_by(Event.id)) if e.to_state != e.from_state]
    assert steps == ["E1", "E2", "E4", "E5-E8", "E9", "E11-E14", "E15", "E40", "E41-E42"]


def test_round_trip_through_the_embedded_system(pf: PfWorld, tmp_path: Path) -> None:
    address = "carol@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource={"after": "0s", "consent": True})
    boxes = [{"address": address, "aliases": ["carol.a@corp.example"]}]
    engine = pf.engine(pf.write(tmp_path / "v1", [pol, placement("h", "pf1", boxes,
                                                                   policy_name="p")]), state)
    engine.apply()
    old_ids = seed(engine.drivers["pf1"], box, address)
    engine.drivers["pf1"].write_diary(box, b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\n"
                                      b"UID:c1\r\nDTSTAMP:20260101T000000Z\r\nSUMMARY:x\r\n"
                                      b"END:VEVENT\r\nEND:VCALENDAR\r\n")
    for step, target in enumerate(["s1", "pf1"]):
        moving = placement("h", target, boxes, policy_name="p")
        moving["spec"]["allowMoveBack"] = True  # the second leg moves a finished mailbox back
        engine = pf.engine(pf.write(tmp_path / f"v{step + 2}", [pol, moving]), state)
        report = engine.apply()
        assert not report.errors, [r.message for r in report.errors]
        assert engine.fed.lookup(address) == physical_address(target, box)
        found: dict[str, int] = {}
        driver = engine.drivers[target]
        for folder in driver.list_folders(box):
            for msg in driver.list_messages(box, folder):
                found[msg.message_id or ""] = found.get(msg.message_id or "", 0) + 1
        assert found == dict.fromkeys(old_ids, 1)
        assert driver.read_diary(box) is not None
    assert engine.drivers["s1"].get_account(box) is None


def _with_secret_file(pf: PfWorld, directory: Path, system: str, secret: Path,
                      extra: list[dict[str, Any]]) -> Path:
    docs = [dict(d) for d in pf.base]
    for i, doc in enumerate(docs):
        if doc["metadata"]["name"] == system:
            spec = yaml.safe_load(yaml.safe_dump(doc["spec"]))
            spec["postfixDovecot"]["masterUser"]["password"] = {"file": str(secret)}
            docs[i] = {**doc, "spec": spec}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "base.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (directory / "wanted.yaml").write_text(yaml.safe_dump_all(extra, sort_keys=False))
    return directory


def test_bad_credentials_wait_with_address_and_step(pf: PfWorld, tmp_path: Path) -> None:
    address = "dave@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource={"after": "0s", "consent": True})
    boxes = [{"address": address}]
    engine = pf.engine(pf.write(tmp_path / "v1", [pol, placement("h", "pf1", boxes,
                                                                   policy_name="p")]), state)
    engine.apply()
    old_ids = seed(engine.drivers["pf1"], box, address)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    bad = _with_secret_file(pf, tmp_path / "bad", "pf1", wrong,
                            [pol, placement("w", "pf2", boxes, policy_name="p")])
    result = run_cli("--specs", str(bad), "--state", state, "--apply", cwd=tmp_path)
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if "refused" in x)
    assert address in line and "E15" in line and "pf1: IMAP 127.0.0.1:" in line, result.stdout
    assert "master user 'mailferry'" in line and "not-the-password" not in result.stdout
    assert state_of(engine, address) == 7  # waits at E15: nothing verified, nothing deleted
    assert engine.drivers["pf1"].get_account(box) is not None
    good = pf.write(tmp_path / "good", [pol, placement("w", "pf2", boxes, policy_name="p")])
    engine = pf.engine(good, state)
    with engine.store.session() as session:  # the back-off would postpone the retry
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        m.next_attempt_at = None
    assert not engine.apply().errors
    assert state_of(engine, address) == 13
    found = pf.hosts["pf2"].message_ids(box)
    assert {mid: found[mid] for mid in old_ids} == dict.fromkeys(old_ids, 1)


def test_dovecot_down_waits_then_resumes(pf: PfWorld, tmp_path: Path) -> None:
    address = "eve@corp.example"
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource="never")
    boxes = [{"address": address}]
    engine = pf.engine(pf.write(tmp_path / "v1", [pol, placement("h", "pf1", boxes,
                                                                   policy_name="p")]), state)
    engine.apply()
    moved = pf.write(tmp_path / "v2", [pol, placement("w", "pf2", boxes, policy_name="p")])
    pf2 = pf.hosts["pf2"]
    pf2.stop_dovecot()
    try:
        result = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    finally:
        pf2.start_dovecot()
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if "unreachable" in x)
    assert address in line and "E2" in line and "pf2: Dovecot LMTP" in line, result.stdout
    assert state_of(engine, address) == 0
    assert pf.engine(moved, state).drivers["pf2"].get_account(mailbox_id_for(address)) is None
    engine = pf.engine(moved, state)
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        m.next_attempt_at = None
    assert not engine.apply().errors
    assert state_of(engine, address) == 10
    assert engine.fed.lookup(address) == physical_address("pf2", mailbox_id_for(address))


def test_foreign_imap_source(pf: PfWorld, tmp_path: Path) -> None:
    """A plain Dovecot we do not administer (no Postfix): per-user passwords, then master."""
    old = MailHost("old", make_root("mailferry-old-"), fed_port=1)
    try:
        old.write_config()
        user = pwd.getpwnam("vmail")
        (old.state_dir / "passwd").write_text(
            f"frank=corp.example:{{PLAIN}}pw-frank:{user.pw_uid}:{user.pw_gid}::"
            f"{old.root}/mail/frank=corp.example::\n")
        old.start_dovecot()
        passwords = tmp_path / "passwords"
        passwords.write_text("# address password\nfrank@corp.example pw-frank\n")
        system = {"apiVersion": "mailferry/v1", "kind": "MailSystem",
                  "metadata": {"name": "old"},
                  "spec": {"driver": "imap", "domains": ["corp.example"], "imap": {
                      "server": f"127.0.0.1:{old.imap_port}", "tls": "none",
                      "login": "per-user", "passwords": {"file": str(passwords)},
                      "loginFormat": "{local}={domain}", "stateDir": str(tmp_path / "old")}}}
        pf.base.append(system)
        try:
            address = "frank@corp.example"
            box = mailbox_id_for(address)
            state = f"sqlite:///{tmp_path / 'state.db'}"
            pol = policy("p", deleteSource={"after": "0s", "consent": True}, diary=False)
            boxes = [{"address": address}]
            engine = pf.engine(pf.write(tmp_path / "v1", [pol, placement(
                "h", "old", boxes, policy_name="p")]), state)
            assert not engine.apply().errors
            old_ids = seed(engine.drivers["old"], box, address)
            engine = pf.engine(pf.write(tmp_path / "v2", [pol, placement(
                "w", "pf2", boxes, policy_name="p")]), state)
            assert not engine.apply().errors
            assert state_of(engine, address) == 13
            found = pf.hosts["pf2"].message_ids(box)
            assert {mid: found[mid] for mid in old_ids} == dict.fromkeys(old_ids, 1)
            assert old.message_ids(box) == dict.fromkeys(old_ids, 1)  # nothing deleted there
            flags = {m.flags for f in ("INBOX", "Sent")
                     for m in engine.drivers["pf2"].list_messages(box, f)}
            assert flags == {"S"}
        finally:
            pf.base.remove(system)
        master = ImapDriver("old", ImapOptions(
            server=Endpoint("127.0.0.1", old.imap_port), state_dir=str(tmp_path / "old2"),
            tls="none", login="master", login_format="{local}={domain}",
            master=MasterUser("mailferry", SecretRef(file=str(old.password_file)))))
        master.create_mailbox(box, access_addresses=(address,))
        assert master.mailbox_info(box).messages == 3
    finally:
        old.stop()
        shutil.rmtree(old.root, ignore_errors=True)
