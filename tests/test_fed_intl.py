"""fed and international addresses: one directory entry for both forms of an IDN domain,
UTF-8 local parts end to end over SMTPUTF8, and what a next hop without SMTPUTF8 gets.

Real fed processes and aiosmtpd listeners on 127.0.0.1: `u8` announces SMTPUTF8, `plain`
(LMTP) does not. The Postfix + Dovecot side is `tests/test_pfdovecot_intl.py`.
"""

from __future__ import annotations

import json
import smtplib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import PermanentError

from fedraw import Utf8System
from fedutil import FakeSystem, Fed
from helpers import mail
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

JUERGEN_U = "j\u00fcrgen@b\u00fccher.example"  # jürgen@bücher.example
JUERGEN_A = "j\u00fcrgen@xn--bcher-kva.example"
INFO_U, INFO_A = "info@b\u00fccher.example", "info@xn--bcher-kva.example"


@pytest.fixture
def sinks() -> Iterator[tuple[FakeSystem, FakeSystem]]:
    u8, plain = Utf8System("u8", protocol="smtp").start(), FakeSystem("plain").start()
    yield u8, plain
    u8.stop()
    plain.stop()


@pytest.fixture
def fed(tmp_path: Path, sinks: tuple[FakeSystem, FakeSystem]) -> Iterator[Fed]:
    # --domain in U-labels: fed serves it in both forms
    running = Fed(tmp_path / "fed", list(sinks),
                  domains=("corp.example", "b\u00fccher.example")).start()
    yield running
    running.kill()


def send_utf8(port: int, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, object]:
    """One transaction with SMTPUTF8 (smtplib then sends the commands as UTF-8)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("tester.example")
        return dict(client.sendmail(mail_from, rcpts, data, mail_options=["SMTPUTF8"]))


def ids(system: FakeSystem) -> Counter[str]:
    return Counter(system.ids())


def test_directory_has_one_entry_for_both_forms(fed: Fed, sinks: tuple[FakeSystem, ...]
                                                ) -> None:
    u8 = sinks[0]
    physical = u8.physical("j\u00fcrgen=xn--bcher-kva.example")
    entry = fed.client.put_entry("J\u00dcRGEN@B\u00fccher.Example", physical)
    assert entry.address == JUERGEN_A  # the key: A-labels, local part lowercased
    for form in (JUERGEN_U, JUERGEN_A, "ju\u0308rgen@xn--bcher-kva.example"):  # NFD too
        assert fed.client.lookup(form) == physical
    fed.client.put_entry(JUERGEN_U, physical)  # the other spelling: the same entry
    assert fed.client.directory().entries == {JUERGEN_A: physical}
    assert fed.client.delete_entry(JUERGEN_U) is True
    assert fed.client.directory().entries == {}
    with pytest.raises(PermanentError, match="not a valid IDN"):
        fed.client.put_entry("j@b\u00fc\u00dfcher\u200d.example", physical)


def test_either_form_reaches_the_one_mailbox_once(fed: Fed, sinks: tuple[FakeSystem, ...]
                                                  ) -> None:
    u8 = sinks[0]
    fed.client.put_entry(JUERGEN_U, u8.physical("j\u00fcrgen=xn--bcher-kva.example"))
    fed.client.put_entry(INFO_U, u8.physical("info=xn--bcher-kva.example"))
    body = "Subject: gr\u00fc\u00dfe\r\n\r\nh\u00e9llo\r\n"
    for n, rcpt in enumerate([JUERGEN_U, JUERGEN_A]):
        msg = f"From: s@outside.example\r\nMessage-ID: <j{n}@t>\r\n{body}".encode()
        assert send_utf8(fed.smtp_port, "s@outside.example", [rcpt], msg) == {}
    # both spellings in one message: one copy
    msg = f"From: s@outside.example\r\nMessage-ID: <both@t>\r\n{body}".encode()
    assert send_utf8(fed.smtp_port, "s@outside.example", [JUERGEN_U, JUERGEN_A], msg) == {}
    # ASCII local part, A-label domain: no SMTPUTF8 needed at all
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        assert client.sendmail("s@outside.example", [INFO_A],
                               mail.message("a", "info@t", sender="s@outside.example",
                                            to=INFO_A)) == {}
    wait_for(lambda: len(u8.received) == 4, what="four deliveries")
    wait_for(lambda: fed.client.queue().pending == 0, what="an empty queue")
    assert ids(u8) == Counter(["<j0@t>", "<j1@t>", "<both@t>", "<info@t>"])
    rcpts = {m.message_id: m.rcpts for m in u8.received}
    assert rcpts["<both@t>"] == ["j\u00fcrgen=xn--bcher-kva.example@u8.invalid"]
    assert rcpts["<info@t>"] == ["info=xn--bcher-kva.example@u8.invalid"]


def test_sender_domain_goes_as_a_labels_to_a_hop_without_smtputf8(
        fed: Fed, sinks: tuple[FakeSystem, FakeSystem]) -> None:
    plain = sinks[1]
    fed.client.put_entry("info@corp.example", plain.physical("info=corp.example"))
    msg = b"From: s@m\xc3\xbcller.example\r\nMessage-ID: <down@t>\r\nSubject: x\r\n\r\nx\r\n"
    assert send_utf8(fed.smtp_port, "s@m\u00fcller.example", ["info@corp.example"], msg) == {}
    got = wait_for(lambda: list(plain.received), what="the delivery")[0]
    assert got.mail_from == "s@xn--mller-kva.example"
    assert got.rcpts == ["info=corp.example@plain.invalid"]


def test_utf8_local_part_to_a_hop_without_smtputf8_is_bounced_and_kept(
        fed: Fed, sinks: tuple[FakeSystem, FakeSystem]) -> None:
    u8, plain = sinks
    fed.client.put_entry("j\u00fcrgen@corp.example", plain.physical("j\u00fcrgen=corp.example"))
    fed.client.put_entry("info@corp.example", plain.physical("info=corp.example"))
    fed.client.put_entry("boss@corp.example", u8.physical("boss=corp.example"))
    msg = mail.message("mixed", "mixed@t", sender="boss@corp.example", to="info@corp.example")
    assert send_utf8(fed.smtp_port, "boss@corp.example",
                     ["j\u00fcrgen@corp.example", "info@corp.example"], msg) == {}
    wait_for(lambda: fed.client.queue().shunted == 1, what="the refused recipient shunted")
    dsn = wait_for(lambda: list(u8.received), what="the bounce at the sender's system")[0]
    wait_for(lambda: fed.client.queue().pending == 0, what="an empty queue")
    # The ASCII recipient of the same transaction got its copy; the other one nothing.
    assert [(m.message_id, m.rcpts) for m in plain.received] == [
        ("<mixed@t>", ["info=corp.example@plain.invalid"])]
    text = dsn.data.decode("utf-8", "replace")
    assert "5.6.7" in text and "SMTPUTF8" in text and "smtputf8_enable = yes" in text
    assert "<mixed@t>" in text  # the original comes back with the report
    infos = list((fed.state_dir / "spool" / "shunt").glob("*.json"))
    info = json.loads(infos[0].read_text())
    assert len(infos) == 1 and info["code"] == 553 and "does not offer" in info["reason"]
    assert b"Message-ID: <mixed@t>" in infos[0].with_suffix(".eml").read_bytes()
    assert fed.client.deliveries(rcpt="j\u00fcrgen@corp.example")[-1].result == "shunted"


def test_unknown_user_of_an_idn_domain_in_either_form(fed: Fed) -> None:
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        client.ehlo("t")
        client.mail("s@outside.example", ["SMTPUTF8"])
        for rcpt in ("nobody@b\u00fccher.example", "nobody@xn--bcher-kva.example"):
            code, text = client.rcpt(rcpt)
            assert (code, text.decode()[:5]) == (550, "5.1.1"), text  # fed's domain, no relay


def test_smarthost_without_smtputf8_gets_a_labels_or_a_refusal(
        tmp_path: Path, sinks: tuple[FakeSystem, FakeSystem]) -> None:
    u8 = sinks[0]
    relay = FakeSystem("relay", protocol="smtp").start()  # no SMTPUTF8
    running = Fed(tmp_path / "fed", [u8], extra=["--smarthost", f"127.0.0.1:{relay.port}",
                                                 "--relay-network", "127.0.0.1/32"]).start()
    try:
        running.client.put_entry("boss@corp.example", u8.physical("boss=corp.example"))
        msg = mail.message("out", "out@t", sender="boss@corp.example", to="x@example.net")
        assert send_utf8(running.smtp_port, "boss@corp.example",
                         ["x@m\u00fcller.example", "j\u00f6rg@m\u00fcller.example"], msg) == {}
        got = wait_for(lambda: list(relay.received), what="the relayed copy")[0]
        assert got.rcpts == ["x@xn--mller-kva.example"] and got.message_id == "<out@t>"
        dsn = wait_for(lambda: list(u8.received), what="the bounce for the other one")[0]
        wait_for(lambda: running.client.queue().pending == 0, what="an empty queue")
        text = dsn.data.decode("utf-8", "replace")
        assert "j\u00f6rg@m\u00fcller.example" in text and "5.6.7" in text
        assert len(relay.received) == 1 and running.client.queue().shunted == 1
    finally:
        running.kill()
        relay.stop()
