"""International addresses on real servers: fed, a private Postfix + Dovecot (`pf1`,
`tests/pfdovecot.py`) and the embedded maildir system `s1`, all on 127.0.0.1.

What is proved here, every message counted by Message-ID in the real Maildirs:

- an IDN domain is one domain on Postfix + Dovecot: mail through fed to either form (and
  to an alias in the other form) lands once in the one mailbox; Postfix's own maps answer
  both forms (`postmap -q`, the lookup Postfix does, casefolded);
- a UTF-8 alias (`jürgen@mail.bücher.example`) of an ASCII mailbox on Postfix + Dovecot:
  through fed by either form, with UTF-8 headers, once in the Maildir (fed routes it to the
  ASCII physical address, so no hop needs SMTPUTF8);
- a UTF-8 local part end to end where every hop has SMTPUTF8 (fed -> the embedded system),
  and a local user of that system writing to the other form: delivered there, not via fed;
- on this Postfix + Dovecot (Dovecot 2.3: no SMTPUTF8 in its LMTP) a mailbox with a UTF-8
  local part is refused by the driver with the system, the reason and what to set, and
  nothing is written;
- Postfix with smtputf8_enable = no: the driver refuses a UTF-8 alias naming the setting,
  and fed refuses to send a UTF-8 recipient there (553 5.6.7): the message is shunted for
  the admin and bounced to its sender, whose bounce arrives once; nothing is lost.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.pfdovecot_tables import Tables
from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver
from reconciler.engine import Engine
from reconciler.errors import TemporaryError

from helpers import mail
from helpers.waiting import wait_for
from pfdovecot import MailHost, make_root
from pfworld import WHY_NOT, PfWorld
from world import mailbox_message_ids, placement, run_cli

pytestmark = pytest.mark.timeout(180)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"real Postfix + Dovecot unavailable: {WHY_NOT}", allow_module_level=True)

IDN = "b\u00fccher.example"  # bücher.example
ACE = "xn--bcher-kva.example"
INFO, INFO_BOX = f"info@{IDN}", f"info={ACE}"
JUERGEN = f"j\u00fcrgen@{IDN}"
# on pf1 (Dovecot 2.3: no UTF-8 mailbox id) the UTF-8 form is an alias of an ASCII mailbox
JUERGEN_ASCII, JUERGEN_PF = f"juergen@{IDN}", f"j\u00fcrgen@mail.{IDN}"


@pytest.fixture(scope="module")
def pf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PfWorld]:
    def hosts(fed_port: int) -> dict[str, MailHost]:
        return {"pf1": MailHost("pf1", make_root("mailferry-pf1-"), fed_port,
                                domains=("corp.example", IDN, f"mail.{IDN}"))}
    world = PfWorld(tmp_path_factory.mktemp("pfintl"), hosts=hosts)
    world.base[0]["spec"]["domains"] = ["corp.example", ACE]  # s1, in the other form
    yield world
    world.stop()


@pytest.fixture(scope="module")
def engine(pf: PfWorld, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """info@bücher.example (alias in A-labels) on pf1, jürgen@bücher.example on s1."""
    root = tmp_path_factory.mktemp("specs")
    specs = pf.write(root / "v1", [
        placement("pf", "pf1", [{"address": INFO, "aliases": [f"kontakt@{ACE}"]},
                                {"address": JUERGEN_ASCII, "aliases": [JUERGEN_PF]}]),
        placement("emb", "s1", [{"address": JUERGEN}])])
    built = pf.engine(specs, f"sqlite:///{root / 'state.db'}")
    report = built.apply()
    assert not report.errors, [r.message for r in report.errors]
    return built


def send(port: int, mail_from: str, rcpts: list[str], mid: str, *, utf8: bool) -> None:
    """One message (ASCII headers) over SMTP; with SMTPUTF8 when asked."""
    data = mail.message("intl", mid, sender="x@outside.example", to="list@outside.example")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        refused = client.sendmail(mail_from, rcpts, data,
                                  mail_options=["SMTPUTF8"] if utf8 else [])
    assert refused == {}


def postmap_query(host: MailHost, key: str) -> str:
    done = subprocess.run(["postmap", "-c", str(host.postfix_dir), "-q", key,
                           f"hash:{host.state_dir / 'virtual_alias'}"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def offers_smtputf8(host: MailHost) -> bool:
    with smtplib.SMTP("127.0.0.1", host.smtp_port, timeout=10) as client:
        client.ehlo("t")
        return bool(client.has_extn("smtputf8"))


def set_smtputf8(host: MailHost, engine: Engine, on: bool) -> None:
    """smtputf8_enable as an admin changes it (postconf -e, postfix reload), then fed told,
    as the reconciler does after changing a system. Idle smtpd processes of the old
    configuration may still take a connection just after the reload: wait until three
    fresh sessions in a row show the new one."""
    subprocess.run(["postconf", "-c", str(host.postfix_dir), "-e",
                    f"smtputf8_enable={'yes' if on else 'no'}"], check=True, timeout=30)
    subprocess.run(["postfix", "-c", str(host.postfix_dir), "reload"], check=True, timeout=30,
                   capture_output=True)
    wait_for(lambda: all(offers_smtputf8(host) == on for _ in range(3)), timeout=60,
             what=f"Postfix sessions with smtputf8_enable = {on}")
    engine.fed.refresh_system("pf1")


def test_idn_domain_is_one_domain_on_postfix_and_dovecot(pf: PfWorld, engine: Engine) -> None:
    host, fed_port = pf.hosts["pf1"], engine.specs.fed.smtp.port
    assert engine.drivers["pf1"].get_account(INFO_BOX) is not None
    physical = f"{INFO_BOX}@pf1.invalid"
    assert engine.fed.lookup(INFO) == engine.fed.lookup(f"INFO@{ACE}") == physical
    # The A-label form is the key (casefolded by Postfix's lookup); Dovecot 2.3's LMTP has no
    # SMTPUTF8, so the U-label form is left to fed (Postfix would bounce it at LMTP, 5.6.7).
    for key in (f"info@{ACE}", "INFO@XN--BCHER-KVA.example", f"kontakt@{ACE}"):
        assert postmap_query(host, key) == physical, key
    assert postmap_query(host, INFO) == postmap_query(host, f"kontakt@{IDN}") == ""
    send(fed_port, "x@outside.example", [INFO], "<u-form@t>", utf8=True)
    send(fed_port, "x@outside.example", [f"Info@{ACE}"], "<a-form@t>", utf8=False)
    send(fed_port, "x@outside.example", [f"kontakt@{IDN}"], "<alias@t>", utf8=True)
    # both forms in one message: one copy
    send(fed_port, "x@outside.example", [INFO, f"info@{ACE}"], "<both@t>", utf8=True)
    # a local user of pf1 writing to Postfix itself, in U-labels
    send(host.smtp_port, "x@outside.example", [INFO], "<local@t>", utf8=True)
    want = {"<u-form@t>", "<a-form@t>", "<alias@t>", "<both@t>", "<local@t>"}
    wait_for(lambda: set(host.message_ids(INFO_BOX)) >= want, timeout=60, what="five messages")
    wait_for(lambda: engine.fed.queue().pending == 0 and host.queue_files() == 0,
             timeout=60, what="empty queues")
    assert host.message_ids(INFO_BOX) == dict.fromkeys(want, 1)
    log = host.maillog()
    assert "status=bounced" not in log
    # the local user's U-label mail went out to fed and came back to the ASCII physical
    assert f"to=<{INFO}>, relay=127.0.0.1[127.0.0.1]:{fed_port}" in log


def test_utf8_alias_through_fed_to_postfix_and_dovecot_once_by_either_form(
        pf: PfWorld, engine: Engine) -> None:
    host, fed_port = pf.hosts["pf1"], engine.specs.fed.smtp.port
    box = f"juergen={ACE}"
    assert engine.fed.lookup(JUERGEN_PF) == f"{box}@pf1.invalid"
    assert postmap_query(host, f"j\u00fcrgen@mail.{ACE}") == f"{box}@pf1.invalid"
    for n, rcpt in enumerate([JUERGEN_PF, f"J\u00dcRGEN@mail.{ACE}"]):
        data = (f"From: x@outside.example\r\nTo: {rcpt}\r\nSubject: gr\u00fc\u00dfe\r\n"
                f"Message-ID: <pf-j{n}@t>\r\n\r\nh\u00e9llo\r\n").encode()  # UTF-8 headers
        with smtplib.SMTP("127.0.0.1", fed_port, timeout=20) as client:
            assert client.sendmail("x@outside.example", [rcpt], data,
                                   mail_options=["SMTPUTF8"]) == {}
    want = {"<pf-j0@t>", "<pf-j1@t>"}
    wait_for(lambda: set(host.message_ids(box)) >= want, timeout=60, what="two messages")
    wait_for(lambda: engine.fed.queue().pending == 0 and host.queue_files() == 0,
             timeout=60, what="empty queues")
    assert host.message_ids(box) == dict.fromkeys(want, 1)
    assert "status=bounced" not in host.maillog()


def test_utf8_local_part_end_to_end_where_every_hop_has_smtputf8(pf: PfWorld,
                                                                 engine: Engine) -> None:
    fed_port = engine.specs.fed.smtp.port
    key = f"j\u00fcrgen@{ACE}"
    assert engine.fed.lookup(JUERGEN) == f"j\u00fcrgen={ACE}@s1.invalid"
    send(fed_port, "x@outside.example", [JUERGEN], "<j-u@t>", utf8=True)
    send(fed_port, "x@outside.example", [f"J\u00dcRGEN@{ACE}"], "<j-a@t>", utf8=True)
    send(fed_port, "x@outside.example", [JUERGEN, key], "<j-both@t>", utf8=True)
    want = {"<j-u@t>", "<j-a@t>", "<j-both@t>"}
    wait_for(lambda: set(mailbox_message_ids(engine, "s1", key)) >= want, timeout=60,
             what="three messages")
    wait_for(lambda: engine.fed.queue().pending == 0, timeout=60, what="an empty queue")
    assert mailbox_message_ids(engine, "s1", key) == dict.fromkeys(want, 1)
    # a local user of s1 writing in U-labels, other case: delivered by s1 itself, not via fed
    sub = engine.specs.systems["s1"].submission
    assert sub is not None
    send(sub.port, "colleague@corp.example", [f"J\u00dcRGEN@{IDN}"], "<j-local@t>", utf8=True)
    wait_for(lambda: mailbox_message_ids(engine, "s1", key)["<j-local@t>"] == 1,
             timeout=60, what="the local delivery")
    assert not [d for d in engine.fed.deliveries() if d.message_id == "<j-local@t>"]
    # the text plan shows U-labels (the JSON keeps the key)
    plan = run_cli("--specs", engine.specs.root, "--state", str(engine.store.url), "--plan",
                   "-v", cwd=Path(engine.specs.root))
    assert f"= {JUERGEN} " in plan.stdout and key not in plan.stdout, (plan.stdout, plan.stderr)
    # an admin asking for the history in the other form, other case, finds it
    done = run_cli("--state", str(engine.store.url), "events", f"J\u00dcRGEN@{IDN}",
                   cwd=Path(engine.specs.root))
    assert done.returncode == 0 and " create " in done.stdout, (done.stdout, done.stderr)


def test_utf8_mailbox_on_dovecot_without_smtputf8_is_refused_with_what_to_set(
        pf: PfWorld, engine: Engine, tmp_path: Path) -> None:
    host = pf.hosts["pf1"]
    specs = pf.write(tmp_path / "v2", [
        placement("pf", "pf1", [{"address": INFO, "aliases": [f"kontakt@{ACE}"]},
                                {"address": JUERGEN_ASCII, "aliases": [JUERGEN_PF]},
                                {"address": "j\u00fcrgen@corp.example"}]),
        placement("emb", "s1", [{"address": JUERGEN}])])
    again = pf.engine(specs, str(engine.store.url))
    before = (host.state_dir / "passwd").read_text(), (host.state_dir / "virtual_alias").read_text()
    errors = [r.message for r in again.apply(max_passes=3).errors]
    assert errors and all("j\u00fcrgen" in e for e in errors), errors
    text = errors[0]
    assert "pf1: cannot host" in text and "UTF-8 local part" in text
    assert f"Dovecot's LMTP at 127.0.0.1:{host.lmtp_port} does not offer SMTPUTF8" in text
    assert "nothing changed" in text
    # nothing half-applied: no account, no map line, no directory entry
    after = (host.state_dir / "passwd").read_text(), (host.state_dir / "virtual_alias").read_text()
    assert after == before
    assert again.fed.lookup("j\u00fcrgen@corp.example") is None


def test_postfix_without_smtputf8_refuses_clearly_and_loses_nothing(
        pf: PfWorld, engine: Engine) -> None:
    host, fed_port = pf.hosts["pf1"], engine.specs.fed.smtp.port
    driver = engine.drivers["pf1"]
    assert isinstance(driver, PostfixDovecotDriver)
    set_smtputf8(host, engine, False)
    try:
        # The driver: a UTF-8 alias needs Postfix's SMTPUTF8; nothing changes.
        with pytest.raises(TemporaryError,
                           match=r"smtputf8_enable = 'no' \(set smtputf8_enable = yes"):
            driver.set_addresses(INFO_BOX, (INFO,), (f"kontakt@{ACE}", f"\u00e4rger@{ACE}"))
        assert postmap_query(host, f"\u00e4rger@{ACE}") == ""
        # fed: a recipient whose physical address has a UTF-8 local part, on this Postfix
        # (a mailbox made before the admin turned SMTPUTF8 off)
        stranded = f"\u00f6l={ACE}@pf1.invalid"
        engine.fed.put_entry(f"\u00f6l@{IDN}", stranded)
        shunted = engine.fed.queue().shunted
        send(fed_port, INFO, [f"\u00f6l@{IDN}"], "<stranded@t>", utf8=True)
        wait_for(lambda: engine.fed.queue().shunted == shunted + 1, timeout=60, what="the shunt")
        # The bounce goes to the sender, info@bücher.example on pf1: it arrives there once.
        dsn = wait_for(lambda: [m for m, n in host.message_ids(INFO_BOX).items()
                                if m not in ("<u-form@t>", "<a-form@t>", "<alias@t>",
                                             "<both@t>", "<local@t>")],
                       timeout=60, what="the bounce in the sender's mailbox")
        wait_for(lambda: engine.fed.queue().pending == 0 and host.queue_files() == 0,
                 timeout=60, what="empty queues")
        assert len(dsn) == 1 and host.message_ids(INFO_BOX)[dsn[0]] == 1
        text = host.doveadm("fetch", "-u", INFO_BOX, "text", "mailbox", "INBOX",
                            "header", "message-id", dsn[0])
        assert "5.6.7" in text and "smtputf8_enable = yes" in text and "<stranded@t>" in text
        rows = [d for d in engine.fed.deliveries(rcpt=f"\u00f6l@{ACE}")]
        assert rows and rows[-1].result == "shunted" and "does not offer" in rows[-1].detail
        infos = sorted((Path(engine.specs.fed.state_dir) / "spool" / "shunt").glob("*.json"))
        info: dict[str, Any] = json.loads(infos[-1].read_text())
        assert info["code"] == 553
        assert b"<stranded@t>" in infos[-1].with_suffix(".eml").read_bytes()  # kept
    finally:
        set_smtputf8(host, engine, True)


def test_both_idn_forms_are_keys_when_the_lmtp_server_offers_smtputf8(tmp_path: Path) -> None:
    """What a Dovecot with SMTPUTF8 in its LMTP gets (none runs here: rendered, not served)."""
    tables = Tables(tmp_path, "pf9", "", str(tmp_path / "mail"), 0, 0, files=False)
    with tables.write() as conn:
        conn.execute("INSERT INTO accounts (mailbox_id, access_addresses, aliases) "
                     "VALUES (?, ?, ?)", (INFO_BOX, json.dumps([f"info@{ACE}"]),
                                          json.dumps(["kontakt@corp.example"])))
    with tables.read() as conn:
        assert tables.render(conn)["virtual_alias"].splitlines()[1:] == [
            f"info@{ACE}\t{INFO_BOX}@pf9.invalid", f"kontakt@corp.example\t{INFO_BOX}@pf9.invalid"]
        tables.unicode_keys = True
        assert tables.render(conn)["virtual_alias"].splitlines()[1:] == [
            f"info@{ACE}\t{INFO_BOX}@pf9.invalid", f"{INFO}\t{INFO_BOX}@pf9.invalid",
            f"kontakt@corp.example\t{INFO_BOX}@pf9.invalid"]
