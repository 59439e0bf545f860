"""The data mover between two embedded maildir systems, through the pipeline and its
`DriverEndpoint`s (what the steps use for drivers without IMAP): copy, resume after a
crash, verify, diary merge and source validation. (These are the behaviours the first
copier, `copy.py`, was tested for; it is gone, the pipeline keeps every one of them.)"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from reconciler.drivers.maildir import MaildirDriver
from reconciler.errors import PermanentError
from reconciler.mover.calendar import copy_diary, merge_calendars, verify_diary
from reconciler.mover.endpoints import AppendResult, DriverEndpoint, Outgoing
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.runner import Job, run_jobs
from reconciler.mover.validate import validate_source
from reconciler.state.store import Store, default_url

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


def count(driver: MaildirDriver, box: str) -> int:
    return sum(len(driver.list_messages(box, f)) for f in driver.list_folders(box))


def move(src: MaildirDriver, dst: MaildirDriver | DriverEndpoint, *,
         manifest: Manifest | None = None, options: Options | None = None) -> MailboxReport:
    """One pass of the pipeline from BOX1 to BOX2 (what `service.move_mail` runs)."""
    target = dst if isinstance(dst, DriverEndpoint) else DriverEndpoint(dst, BOX2)
    job = Job("jean", lambda: DriverEndpoint(src, BOX1), lambda: target,
              options=options or Options())
    return run_jobs([job], manifest=manifest, retries=0)[0]


def manifest_in(tmp_path: Path) -> Manifest:
    return Manifest(Store(default_url(tmp_path / "state.db")))


def test_copy_keeps_folders_flags_dates_and_bytes(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    total = fill(src)
    before = content(src, BOX1)
    manifest = manifest_in(tmp_path)
    report = move(src, dst, manifest=manifest)
    assert report.verified and report.copied == total and report.failed == 0
    assert report.bytes_copied == sum(len(msg(n, f)) for f in FOLDERS for n in range(4))
    assert sorted(dst.list_folders(BOX2)) == sorted(FOLDERS)
    assert content(dst, BOX2) == before
    assert content(src, BOX1) == before  # the source is untouched
    for folder in FOLDERS:
        assert sorted(dst.read_message(BOX2, folder, m.key)
                      for m in dst.list_messages(BOX2, folder)) == \
            sorted(msg(n, folder) for n in range(4))
    assert manifest.copied_count("jean") == total
    again = move(src, dst, manifest=manifest)
    assert (again.copied, again.present, again.verified) == (0, total, True)
    assert content(dst, BOX2) == before


class CrashingTarget(DriverEndpoint):
    """BOX2 whose process dies right after its fifth message was stored, before the
    manifest row of that batch is written (the worst instant of a kill -9)."""

    def __init__(self, driver: MaildirDriver) -> None:
        super().__init__(driver, BOX2)
        self.stored = 0

    async def append(self, name: str, messages: Sequence[Outgoing]) -> AppendResult:
        result = await super().append(name, messages)
        self.stored += len(messages)
        if self.stored >= 5:
            raise SystemExit("killed")  # not retryable: the whole run stops here
        return result


def test_crash_mid_copy_then_resume_copies_each_once(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    total = fill(src)
    manifest = manifest_in(tmp_path)
    with pytest.raises(SystemExit):
        move(src, CrashingTarget(dst), manifest=manifest,
             options=Options(batch_messages=1, appends_in_flight=1))
    assert count(dst, BOX2) == 5
    report = move(src, dst, manifest=manifest)
    assert (report.copied, report.present, report.verified) == (total - 5, 5, True)
    assert content(dst, BOX2) == content(src, BOX1)


def test_identical_messages_are_a_multiset(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    for _ in range(2):
        src.append_message(BOX1, "INBOX", msg(1), internal_date=1_600_000_000)
    dst.append_message(BOX2, "INBOX", msg(1), internal_date=1_600_000_000)  # one already there
    report = move(src, dst)
    assert (report.copied, report.present, report.verified) == (1, 1, True)
    assert len(dst.list_messages(BOX2, "INBOX")) == 2


def test_new_mail_in_target_is_left_alone(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    src.append_message(BOX1, "INBOX", msg(1))
    dst.append_message(BOX2, "INBOX", msg(99))  # arrived in BOX2 after the flip
    report = move(src, dst)
    assert report.verified and len(dst.list_messages(BOX2, "INBOX")) == 2
    assert {m.sha256 for m in dst.list_messages(BOX2, "INBOX")} >= \
        {m.sha256 for m in src.list_messages(BOX1, "INBOX")}


class RefusingTarget(DriverEndpoint):
    """BOX2 that accepts no append (full, or read-only): nothing can be repaired."""

    async def append(self, name: str, messages: Sequence[Outgoing]) -> AppendResult:
        return AppendResult(None, [None] * len(messages), ["quota exceeded"] * len(messages))


def test_missing_message_fails_verification(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    fill(src)
    manifest = manifest_in(tmp_path)
    assert move(src, dst, manifest=manifest).verified
    victim = dst.list_messages(BOX2, "Sent")[0]
    os.remove(dst.store.message_path(BOX2, "Sent", victim.key))
    # verification names the folder whose message is not in BOX2 any more (nothing else)
    report = move(src, RefusingTarget(dst, BOX2), manifest=manifest)
    assert not report.verified and report.missing == 1
    assert {f.folder: f.missing for f in report.folders} == \
        {"INBOX": 0, "Sent": 1, "Archive/2023": 0, "Éléments envoyés": 0}
    sent = next(f for f in report.folders if f.folder == "Sent")
    assert [reason for _, reason in sent.failed] == ["append refused: quota exceeded"]
    healed = move(src, dst, manifest=manifest)  # a target that accepts appends again
    assert healed.verified and healed.copied == 1
    assert victim.sha256 in {m.sha256 for m in dst.list_messages(BOX2, "Sent")}


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
    total = fill(src)
    dst = LossyDriver("s2", tmp_path / "s2", ("127.0.0.1", 3), ("127.0.0.1", 4), "s2.internal")
    manifest = manifest_in(tmp_path)
    report = move(src, dst, manifest=manifest)
    assert not report.verified and report.missing == 1 and report.copied == total
    healed = move(src, dst, manifest=manifest)  # the next run repairs it
    assert healed.verified and healed.copied == 1
    assert content(dst, BOX2) == content(src, BOX1)


def test_empty_source_folder_is_created(tmp_path: Path) -> None:
    src, dst = drivers(tmp_path)
    src.store.folder_dir(BOX1, "Drafts", create=True)
    report = move(src, dst)
    assert report.verified and "Drafts" in [f.folder for f in report.folders]
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
    assert verify_diary(src, BOX1, dst, BOX2) == ["a", "c"]
    assert copy_diary(src, BOX1, dst, BOX2) == 2
    assert verify_diary(src, BOX1, dst, BOX2) == []
    assert dst.list_folders(BOX2) == ["INBOX"] and dst.list_messages(BOX2, "INBOX") == []
    diary = dst.read_diary(BOX2)
    assert diary is not None
    assert summaries(diary) == {"a": "A edited", "c": "C", "t": "T"}
    stamp = os.stat(dst.store.mailbox_dir(BOX2) / "calendar.ics").st_mtime_ns
    assert copy_diary(src, BOX1, dst, BOX2) == 0
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
        copy_diary(src, BOX1, dst, BOX2)
