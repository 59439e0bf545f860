"""The data mover: copy, resume, verify, diary merge and source validation."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from reconciler.drivers.base import StoredMessage
from reconciler.drivers.maildir import MaildirDriver
from reconciler.errors import PermanentError
from reconciler.mover.calendar import merge_calendars
from reconciler.mover.copy import copy_mailbox, verify_mailbox
from reconciler.mover.validate import validate_source

BOX1 = "jean.dupont=corp.example"
BOX2 = "jean.dupont=corp.example"
FOLDERS = ["INBOX", "Sent", "Archive/2023", "Éléments envoyés"]


def msg(n: int, folder: str = "INBOX") -> bytes:
    """A distinct message, CRLF line ends, a non-ASCII header too (raw UTF-8)."""
    return (f"From: a@x.example\r\nSubject: n°{n} in {folder}\r\nMessage-ID: <{n}.{folder}@x>\r\n"
            f"\r\nbody {n}\r\n").encode()


def drivers(tmp_path: Path) -> tuple[MaildirDriver, MaildirDriver]:
    """Source s1 with BOX1 and target s2 with an empty BOX2 (no servers needed)."""
    s1 = MaildirDriver("s1", tmp_path / "s1", ("127.0.0.1", 1), ("127.0.0.1", 2), "s1.internal")
    s2 = MaildirDriver("s2", tmp_path / "s2", ("127.0.0.1", 3), ("127.0.0.1", 4), "s2.internal")
    s1.create_mailbox(BOX1)
    s2.create_mailbox(BOX2, internal_address="jean.dupont@s2.internal")
    return s1, s2


def fill(src: MaildirDriver) -> int:
    """Put messages with flags and dates in every folder; return how many."""
    count = 0
    for f_index, folder in enumerate(FOLDERS):
        for n in range(4):
            src.append_message(BOX1, folder, msg(n, folder), flags="SR"[: n % 3],
                               internal_date=1_600_000_000 + 86400 * (f_index * 10 + n))
            count += 1
    return count


def content(driver: MaildirDriver, box: str) -> dict[str, Counter[tuple[str, str, float]]]:
    """Per folder, the multiset of (sha256, flags, INTERNALDATE)."""
    return {f: Counter((m.sha256, m.flags, m.internal_date) for m in driver.list_messages(box, f))
            for f in driver.list_folders(box)}


def test_copy_keeps_folders_flags_dates_and_bytes(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    total = fill(src)
    before = content(src, BOX1)
    report = copy_mailbox(src, BOX1, dst, BOX2)
    assert report.verified and report.copied == total and report.failed == []
    assert report.bytes_copied == sum(len(msg(n, f)) for f in FOLDERS for n in range(4))
    assert sorted(dst.list_folders(BOX2)) == sorted(FOLDERS)
    assert content(dst, BOX2) == before
    assert content(src, BOX1) == before  # the source is untouched
    for folder in FOLDERS:
        assert sorted(dst.read_message(BOX2, folder, m.key)
                      for m in dst.list_messages(BOX2, folder)) == \
            sorted(msg(n, folder) for n in range(4))
    again = copy_mailbox(src, BOX1, dst, BOX2)
    assert (again.copied, again.present, again.verified) == (0, total, True)
    assert content(dst, BOX2) == before


def test_crash_mid_copy_then_resume_copies_each_once(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    total = fill(src)
    seen: list[bool] = []

    def crash_after_five(message: StoredMessage, copied: bool) -> None:
        seen.append(copied)
        if sum(seen) == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        copy_mailbox(src, BOX1, dst, BOX2, on_message=crash_after_five)
    assert sum(len(dst.list_messages(BOX2, f)) for f in dst.list_folders(BOX2)) == 5
    report = copy_mailbox(src, BOX1, dst, BOX2)
    assert (report.copied, report.present, report.verified) == (total - 5, 5, True)
    assert content(dst, BOX2) == content(src, BOX1)


def test_identical_messages_are_a_multiset(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    for _ in range(2):
        src.append_message(BOX1, "INBOX", msg(1), internal_date=1_600_000_000)
    dst.append_message(BOX2, "INBOX", msg(1), internal_date=1_600_000_000)  # one already there
    report = copy_mailbox(src, BOX1, dst, BOX2)
    assert (report.copied, report.present, report.verified) == (1, 1, True)
    assert len(dst.list_messages(BOX2, "INBOX")) == 2


def test_new_mail_in_target_is_left_alone(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    src.append_message(BOX1, "INBOX", msg(1))
    dst.append_message(BOX2, "INBOX", msg(99))  # arrived in BOX2 after the flip
    report = copy_mailbox(src, BOX1, dst, BOX2)
    assert report.verified and len(dst.list_messages(BOX2, "INBOX")) == 2


def test_missing_message_fails_verification(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    fill(src)
    assert copy_mailbox(src, BOX1, dst, BOX2).verified
    victim = dst.list_messages(BOX2, "Sent")[0]
    path = dst.store.message_path(BOX2, "Sent", victim.key)
    os.remove(path)
    assert verify_mailbox(src, BOX1, dst, BOX2) == [("Sent", victim.sha256)]


class LossyDriver(MaildirDriver):
    """A target that acknowledges one append without storing it."""

    dropped = False

    def append_message(self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
                       internal_date: float | None = None) -> str:
        if not self.dropped:
            self.dropped = True
            return "lost"
        return super().append_message(mailbox_id, folder, data, flags=flags,
                                      internal_date=internal_date)


def test_lost_append_is_caught_by_verification(tmp_path: Path) -> None:
    src, _ = drivers(tmp_path)
    fill(src)
    dst = LossyDriver("s2", tmp_path / "s2", ("127.0.0.1", 3), ("127.0.0.1", 4), "s2.internal")
    report = copy_mailbox(src, BOX1, dst, BOX2)
    assert not report.verified and len(report.missing) == 1
    assert copy_mailbox(src, BOX1, dst, BOX2).verified  # the next run repairs it


def test_empty_source_folder_is_created(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    src.store.folder_dir(BOX1, "Drafts", create=True)
    assert copy_mailbox(src, BOX1, dst, BOX2).verified
    assert "Drafts" in dst.list_folders(BOX2)


# -- diary --------------------------------------------------------------------------------------
def vevent(uid: str, summary: str, seq: int = 0, modified: str = "20240101T100000Z") -> str:
    return (f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:{modified}\r\nLAST-MODIFIED:{modified}\r\n"
            f"SEQUENCE:{seq}\r\nDTSTART:20240301T090000Z\r\nSUMMARY:{summary}\r\nEND:VEVENT\r\n")


def vcal(*events: str) -> bytes:
    return ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n" + "".join(events)
            + "END:VCALENDAR\r\n").encode()


def summaries(ics: bytes) -> dict[str, str]:
    from icalendar import Calendar
    return {str(c["UID"]): str(c["SUMMARY"]) for c in Calendar.from_ical(ics).walk("VEVENT")}


def test_merge_by_uid_and_version() -> None:
    target = vcal(vevent("a", "A old"), vevent("b", "B target", seq=2), vevent("t", "target only"))
    source = vcal(
        vevent("a", "A edited", seq=1),  # higher SEQUENCE: wins
        vevent("b", "B older", seq=1),  # lower SEQUENCE: loses
        vevent("c", "C new"),  # absent: added
    )
    merged, changed = merge_calendars(source, target)
    assert changed == 2
    assert summaries(merged) == {"a": "A edited", "b": "B target", "c": "C new",
                                 "t": "target only"}
    again, zero = merge_calendars(source, merged)
    assert (again, zero) == (merged, 0)


def test_merge_same_sequence_later_modification_wins() -> None:
    target = vcal(vevent("a", "A", seq=1, modified="20240101T100000Z"))
    newer = vcal(vevent("a", "A later", seq=1, modified="20240102T100000Z"))
    older = vcal(vevent("a", "A earlier", seq=1, modified="20231231T100000Z"))
    assert summaries(merge_calendars(newer, target)[0]) == {"a": "A later"}
    assert merge_calendars(older, target) == (target, 0)
    assert merge_calendars(target, None) == (target, 1)


def test_diary_only_copy_leaves_mail_alone(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    fill(src)
    src.write_diary(BOX1, vcal(vevent("a", "A edited", seq=3), vevent("c", "C")))
    dst.write_diary(BOX2, vcal(vevent("a", "A"), vevent("t", "T")))
    report = copy_mailbox(src, BOX1, dst, BOX2, mail=False, diary=True)
    assert report.verified and report.copied == 0 and report.diary_changes == 2
    assert dst.list_folders(BOX2) == ["INBOX"] and dst.list_messages(BOX2, "INBOX") == []
    diary = dst.read_diary(BOX2)
    assert diary is not None
    assert summaries(diary) == {"a": "A edited", "c": "C", "t": "T"}
    stamp = os.stat(dst.store.mailbox_dir(BOX2) / "calendar.ics").st_mtime_ns
    assert copy_mailbox(src, BOX1, dst, BOX2, mail=False).diary_changes == 0
    assert os.stat(dst.store.mailbox_dir(BOX2) / "calendar.ics").st_mtime_ns == stamp


# -- validation -----------------------------------------------------------------------------------
def test_validate_source(tmp_path: Path) -> None:
    src, _ = drivers(tmp_path)
    fill(src)
    assert validate_source(src, BOX1) == []
    cur = src.store.folder_dir(BOX1, "Sent") / "cur"
    junk = b"\x00\xff\xfe\x01garbage\n\nbody"
    (cur / f"1.M1P1.host,S={len(junk)}:2,S").write_bytes(junk)  # header does not parse
    (cur / "2.M2P2.host,S=6:2,S").write_bytes(msg(7))  # size differs from its name
    problems = validate_source(src, BOX1)
    assert len(problems) == 2
    assert problems[0].startswith("Sent/1.M1P1.host") and "header" in problems[0]
    assert problems[1].startswith("Sent/2.M2P2.host") and "S=6" in problems[1]


def test_unparsable_diary_is_a_permanent_error(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    src.write_diary(BOX1, b"not a calendar")
    dst.write_diary(BOX2, vcal(vevent("a", "A")))
    with pytest.raises(PermanentError, match="does not parse"):
        copy_mailbox(src, BOX1, dst, BOX2, mail=False)
