"""Diary data over CalDAV/CardDAV against a real Radicale, and with the embedded system."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from icalendar import Calendar

from reconciler.drivers.maildir import MaildirDriver
from reconciler.mover.dav import (
    DavAccount,
    DavClient,
    dav_to_driver,
    driver_to_dav,
    sync_dav,
    verify_dav,
)

from radicale_server import Radicale


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Radicale, Radicale]]:
    users = {u: f"pw-{u}" for u in ("ann", "ben", "cat")}
    old = Radicale(tmp_path_factory.mktemp("dav-old"), users).start()
    new = Radicale(tmp_path_factory.mktemp("dav-new"), users).start()
    yield old, new
    old.stop()
    new.stop()


def account(server: Radicale, user: str) -> DavAccount:
    return DavAccount(server.url(user), user, f"pw-{user}", timeout=10)


def event(uid: str, summary: str, seq: int = 0, modified: str = "20240101T100000Z") -> bytes:
    return ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\nBEGIN:VEVENT\r\n"
            f"UID:{uid}\r\nDTSTAMP:{modified}\r\nLAST-MODIFIED:{modified}\r\n"
            f"SEQUENCE:{seq}\r\nDTSTART:20240301T090000Z\r\nSUMMARY:{summary}\r\n"
            "END:VEVENT\r\nEND:VCALENDAR\r\n").encode()


def vcard(uid: str, name: str, rev: str) -> bytes:
    return (f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:{name}\r\nN:{name};;;;\r\n"
            f"REV:{rev}\r\nEND:VCARD\r\n").encode()


def summaries(client: DavClient, collection: str) -> dict[str, str]:
    out = {}
    for item in client.items(collection):
        for comp in Calendar.from_ical(item.data).walk("VEVENT"):
            out[str(comp["UID"])] = str(comp["SUMMARY"])
    return out


def test_calendars_and_contacts_then_an_edit_on_the_source(
        servers: tuple[Radicale, Radicale]) -> None:
    old, new = servers
    src, dst = DavClient(account(old, "ann")), DavClient(account(new, "ann"))
    src.make_collection("work", "calendar")
    src.make_collection("contacts", "addressbook")
    assert src.put("work", "e1", event("e1", "Kick-off"), "calendar") == 201
    assert src.put("work", "e2", event("e2", "Review"), "calendar") == 201
    assert src.put("contacts", "c1", vcard("c1", "Jean", "20240101T000000Z"),
                   "addressbook") == 201
    first = sync_dav(account(old, "ann"), account(new, "ann"))
    assert first.verified and (first.added, first.updated) == (3, 0)
    assert dst.collections() == {"work": "calendar", "contacts": "addressbook"}
    assert summaries(dst, "work") == {"e1": "Kick-off", "e2": "Review"}
    again = sync_dav(account(old, "ann"), account(new, "ann"))
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)

    # Edited on the source after the first pass: a higher SEQUENCE wins.
    href = next(i.href for i in src.items("work") if i.uid == "e1")
    etag = next(i.etag for i in src.items("work") if i.uid == "e1")
    assert src.put("work", "e1", event("e1", "Kick-off (moved)", seq=1,
                                       modified="20240105T100000Z"), "calendar",
                   href=href, etag=etag) in (201, 204)
    assert verify_dav(account(old, "ann"), account(new, "ann")) == ["work/e1"]
    delta = sync_dav(account(old, "ann"), account(new, "ann"))
    assert delta.verified and (delta.added, delta.updated) == (0, 1)
    assert summaries(dst, "work") == {"e1": "Kick-off (moved)", "e2": "Review"}


def test_target_edit_is_not_overwritten_by_an_older_source(
        servers: tuple[Radicale, Radicale]) -> None:
    old, new = servers
    src, dst = DavClient(account(old, "ben")), DavClient(account(new, "ben"))
    src.make_collection("cal", "calendar")
    src.put("cal", "x", event("x", "source v0"), "calendar")
    sync_dav(account(old, "ben"), account(new, "ben"))
    item = dst.items("cal")[0]
    dst.put("cal", "x", event("x", "accepted in BOX2", seq=2), "calendar", href=item.href,
            etag=item.etag)
    report = sync_dav(account(old, "ben"), account(new, "ben"))
    assert report.verified and report.unchanged == 1
    assert summaries(dst, "cal") == {"x": "accepted in BOX2"}


def test_embedded_system_calendar_both_ways(servers: tuple[Radicale, Radicale],
                                            tmp_path: Path) -> None:
    _, new = servers
    md = MaildirDriver("s1", tmp_path / "s1", ("127.0.0.1", 1), ("127.0.0.1", 2), "s1.i")
    md.create_mailbox("cat")
    body = "".join(f"BEGIN:VEVENT\r\nUID:{u}\r\nDTSTAMP:20240101T100000Z\r\n"
                   f"DTSTART:20240301T090000Z\r\nSUMMARY:{u.upper()}\r\nEND:VEVENT\r\n"
                   for u in ("a", "b"))
    md.write_diary("cat", f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\n{body}"
                          "END:VCALENDAR\r\n".encode())
    up = driver_to_dav(md, "cat", account(new, "cat"))
    assert up.verified and up.added == 2
    assert driver_to_dav(md, "cat", account(new, "cat")).unchanged == 2
    back = MaildirDriver("s2", tmp_path / "s2", ("127.0.0.1", 1), ("127.0.0.1", 2), "s2.i")
    back.create_mailbox("cat")
    down = dav_to_driver(account(new, "cat"), back, "cat")
    assert down.added == 2
    diary = back.read_diary("cat")
    assert diary is not None
    assert {str(c["UID"]) for c in Calendar.from_ical(diary).walk("VEVENT")} == {"a", "b"}
    assert dav_to_driver(account(new, "cat"), back, "cat").added == 0
