"""The embedded maildir system over real sockets, and its driver's admin methods."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from maildir_system.store import Store, folder_dirname, folder_from_dirname
from reconciler.drivers.base import Contact, DeliveryEndpoint
from reconciler.drivers.maildir import MaildirDriver
from reconciler.errors import PermanentError, TemporaryError

# tests/ is not a package: pytest puts tests/ itself on sys.path, so helpers import flat.
from helpers.mail import message
from sysutil import FakeFed, free_port, lmtp_send, smtp_send, start_system

BOX = "jean.dupont=corp.example"
ADDR = "jean.dupont@corp.example"
System = tuple[FakeFed, "subprocess.Popen[str]", MaildirDriver]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    """A fake fed and a running system s1 with one mailbox (address, alias, internal)."""
    with FakeFed() as fed, start_system(tmp_path, fed_port=fed.port) as (proc, driver):
        driver.create_mailbox(BOX, internal_address="jean.dupont@s1.internal",
                              access_addresses=(ADDR,))
        driver.set_addresses(BOX, (ADDR,), ("jd@corp.example",))
        yield fed, proc, driver


def inbox(driver: MaildirDriver, box: str = BOX) -> list[bytes]:
    """The bytes of every INBOX message."""
    return [driver.read_message(box, "INBOX", m.key) for m in driver.list_messages(box, "INBOX")]


def test_lmtp_to_physical_address_stores_exact_bytes(system: System) -> None:
    _, _, driver = system
    data = message("physical")
    replies = lmtp_send(driver.lmtp, "a@x.example", [f"{BOX}@s1.invalid"], data)
    assert replies[f"{BOX}@s1.invalid"][0] == 250
    assert inbox(driver) == [data]
    journal = Store(driver.root).deliveries(BOX)
    assert [(d.action, d.rcpt) for d in journal] == [("stored", f"{BOX}@s1.invalid")]
    assert journal[0].message_id and journal[0].message_id.startswith("<physical.")


def test_lmtp_alias_internal_and_unknown(system: System) -> None:
    _, _, driver = system
    replies = lmtp_send(driver.lmtp, "a@x.example",
                        ["JD@corp.example", "nobody@corp.example", "jean.dupont@s1.internal"],
                        message("alias"))
    assert replies["nobody@corp.example"][0] == 550
    assert replies["nobody@corp.example"][1].startswith("5.1.1")
    assert replies["JD@corp.example"][0] == 250
    assert replies["jean.dupont@s1.internal"][0] == 250
    # Two recipients of one transaction reach one mailbox: stored once.
    assert len(inbox(driver)) == 1


def test_lmtp_one_reply_per_recipient_across_mailboxes(system: System) -> None:
    _, _, driver = system
    driver.create_mailbox("other=corp.example", access_addresses=("other@corp.example",))
    replies = lmtp_send(driver.lmtp, "a@x.example", [ADDR, "other@corp.example"], message())
    assert {r: c for r, (c, _) in replies.items()} == {ADDR: 250, "other@corp.example": 250}
    assert len(inbox(driver)) == 1 and len(inbox(driver, "other=corp.example")) == 1


def test_redirected_mailbox_resubmits_to_fed_and_stores_nothing(system: System) -> None:
    fed, _, driver = system
    driver.set_redirect(BOX, f"{BOX}@s2.invalid")
    data = message("redirect me")
    replies = lmtp_send(driver.lmtp, "sender@x.example", [ADDR], data)
    assert replies[ADDR][0] == 250
    assert inbox(driver) == []
    assert len(fed.received) == 1
    got = fed.received[0]
    assert (got.mail_from, got.rcpt_tos, got.data) == ("sender@x.example", [f"{BOX}@s2.invalid"],
                                                       data)
    assert [d.action for d in Store(driver.root).deliveries(BOX)] == ["redirected"]


def test_redirect_with_fed_451_answers_451_and_keeps_nothing(system: System) -> None:
    fed, _, driver = system
    driver.set_redirect(BOX, f"{BOX}@s2.invalid")
    fed.handler.answer = "451 4.3.0 spool busy"
    data = message("deferred")
    replies = lmtp_send(driver.lmtp, "sender@x.example", [ADDR], data)
    assert replies[ADDR][0] == 451
    assert inbox(driver) == [] and fed.received == []
    # The sender (fed) still owns the message and retries: now it goes through, once.
    fed.handler.answer = None
    assert lmtp_send(driver.lmtp, "sender@x.example", [ADDR], data)[ADDR][0] == 250
    assert [r.data for r in fed.received] == [data]
    assert inbox(driver) == []


def test_redirect_to_itself_is_stored_not_looped(system: System) -> None:
    fed, _, driver = system
    driver.set_redirect(BOX, f"{BOX}@s1.invalid")
    assert lmtp_send(driver.lmtp, "s@x.example", [ADDR], message())[ADDR][0] == 250
    assert len(inbox(driver)) == 1 and fed.received == []


def test_redirect_with_fed_5xx_passes_it_through(system: System) -> None:
    fed, _, driver = system
    driver.set_redirect(BOX, f"{BOX}@s2.invalid")
    fed.handler.answer = "554 5.7.1 rejected"
    assert lmtp_send(driver.lmtp, "s@x.example", [ADDR], message())[ADDR][0] == 554


def test_redirect_with_fed_down_is_451(tmp_path: Path) -> None:
    with start_system(tmp_path, fed_port=free_port()) as (_, driver):
        driver.create_mailbox(BOX, access_addresses=(ADDR,), redirect_to=f"{BOX}@s2.invalid")
        replies = lmtp_send(driver.lmtp, "s@x.example", [ADDR], message())
        assert replies[ADDR][0] == 451 and replies[ADDR][1].startswith("4.4.1")
        assert inbox(driver) == []


def test_submission_local_and_remote(system: System) -> None:
    fed, _, driver = system
    local = message("local")
    assert smtp_send(driver.submission, "colleague@corp.example", [ADDR], local)[0] == 250
    assert inbox(driver) == [local] and fed.received == []
    remote = message("remote")
    code, _ = smtp_send(driver.submission, ADDR, ["friend@elsewhere.example", ADDR], remote)
    assert code == 250
    assert [(r.rcpt_tos, r.data) for r in fed.received] == [(["friend@elsewhere.example"], remote)]
    assert inbox(driver) == [local, remote]


def test_submission_follows_redirect_and_defers_atomically(system: System) -> None:
    fed, _, driver = system
    driver.set_redirect(BOX, f"{BOX}@s2.invalid")
    fed.handler.answer = "451 4.3.0 later"
    assert smtp_send(driver.submission, "c@corp.example", [ADDR], message())[0] == 451
    fed.handler.answer = None
    data = message("local redirected")
    assert smtp_send(driver.submission, "c@corp.example", [ADDR], data)[0] == 250
    assert [(r.rcpt_tos, r.data) for r in fed.received] == [([f"{BOX}@s2.invalid"], data)]
    assert inbox(driver) == []


def test_submission_sends_a_mailbox_in_cutover_through_fed(system: System) -> None:
    """via_fed (E4 on the target, E5 on the source, until the flip): a local user's mail for
    the mailbox's addresses goes to fed, whose hold and directory decide; fed's own delivery
    to the physical address is still stored, and clearing the mark restores local delivery."""
    fed, _, driver = system
    driver.set_via_fed(BOX, True)
    data = message("local, in cutover")
    assert smtp_send(driver.submission, "colleague@corp.example", [ADDR, "jd@corp.example"],
                     data)[0] == 250
    assert [(r.rcpt_tos, r.data) for r in fed.received] == [([ADDR, "jd@corp.example"], data)]
    assert inbox(driver) == []
    from_fed = message("from fed")
    physical = f"{BOX}@s1.invalid"
    assert lmtp_send(driver.lmtp, "x@outside.example", [physical], from_fed)[physical][0] == 250
    assert inbox(driver) == [from_fed]
    driver.set_via_fed(BOX, False)
    again = message("local again")
    assert smtp_send(driver.submission, "colleague@corp.example", [ADDR], again)[0] == 250
    assert inbox(driver) == [from_fed, again] and len(fed.received) == 1


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    with start_system(tmp_path) as (proc, driver):
        driver.ping()
    assert proc.returncode == 0


def test_ping_fails_with_endpoint_when_down(tmp_path: Path) -> None:
    port = free_port()
    driver = MaildirDriver("s9", tmp_path, ("127.0.0.1", port), ("127.0.0.1", port), "s9.internal")
    with pytest.raises(TemporaryError, match=f"127.0.0.1:{port}"):
        driver.ping()
    assert driver.delivery_endpoint() == DeliveryEndpoint("127.0.0.1", port, "lmtp")


def test_driver_accounts(tmp_path: Path) -> None:
    driver = MaildirDriver("s2", tmp_path, ("127.0.0.1", 1), ("127.0.0.1", 2), "s2.internal")
    acc = driver.create_mailbox(BOX, internal_address="jean.dupont@s2.internal",
                                redirect_to=f"{BOX}@s1.invalid")
    assert acc.physical_address == f"{BOX}@s2.invalid"
    assert acc.redirect_to == f"{BOX}@s1.invalid" and not acc.syncfed
    # Existing mailbox: left as is, returned.
    assert driver.create_mailbox(BOX, access_addresses=("x@y.example",)) == acc
    driver.set_addresses(BOX, (ADDR,), ("jd@corp.example",))
    driver.set_addresses(BOX, (ADDR,), ("jd@corp.example",))
    driver.set_redirect(BOX, None)
    driver.set_syncfed(BOX, True)
    got = driver.get_account(BOX)
    assert got is not None
    assert got.all_addresses == (ADDR, "jd@corp.example")
    assert got.redirect_to is None and got.syncfed
    assert [a.mailbox_id for a in driver.list_accounts()] == [BOX]
    assert driver.list_accounts()[0].physical_address == f"{BOX}@s2.invalid"
    info = driver.mailbox_info(BOX)
    assert (info.mailbox_type, info.messages, info.size_bytes) == ("maildir", 0, 0)
    driver.append_message(BOX, "INBOX", b"Subject: x\r\n\r\nhi\r\n")
    assert driver.mailbox_info(BOX).messages == 1
    assert driver.mailbox_info(BOX).size_bytes == len(b"Subject: x\r\n\r\nhi\r\n")
    with pytest.raises(PermanentError):
        driver.set_redirect("missing", None)
    driver.delete_mailbox(BOX)
    driver.delete_mailbox(BOX)
    assert driver.get_account(BOX) is None and driver.list_accounts() == []
    assert not (tmp_path / "mailboxes" / BOX).exists()


def test_driver_contacts_and_address_book(tmp_path: Path) -> None:
    driver = MaildirDriver("s2", tmp_path, ("127.0.0.1", 1), ("127.0.0.1", 2), "s2.internal")
    contact = Contact(ADDR, ("jd@corp.example", "j.dupont@corp.example"))
    driver.put_contact(contact)
    driver.put_contact(contact)
    assert driver.list_contacts() == [contact]
    driver.put_contact(Contact(ADDR, ("jd@corp.example",)))
    assert driver.list_contacts() == [Contact(ADDR, ("jd@corp.example",))]
    driver.delete_contact(ADDR)
    driver.delete_contact(ADDR)
    assert driver.list_contacts() == []
    driver.apply_address_book({ADDR: f"{BOX}@s1.invalid", "b@corp.example": "b@s2.invalid"})
    driver.apply_address_book({ADDR: f"{BOX}@s2.invalid"})
    assert driver.address_book() == {ADDR: f"{BOX}@s2.invalid"}


@pytest.mark.parametrize("folder", ["Sent", "Archive/2023", "Envoyés", "a.b & c"])
def test_folder_names_round_trip(folder: str) -> None:
    name = folder_dirname(folder)
    assert name.startswith(".") and name.isascii() and "/" not in name
    assert folder_from_dirname(name) == folder
    assert folder_dirname("Archive/2023") == ".Archive.2023"
