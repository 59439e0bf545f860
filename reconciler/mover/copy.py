"""The data mover: copy old mail (and diary data) from BOX1 to BOX2, then prove it (E15-E17).

Why content comparison and not a progress counter: the mover must be idempotent and survive
a crash at any instant (DESIGN invariant 3). A counter ("copied 40 of 100") is a second
truth that can disagree with the mailbox after a crash between an append and the counter's
update. Instead each run compares, per folder, the *multiset* of sha256 digests of the
source with that of the target and appends only the difference. A message appended just
before a crash is found in the target on the next run and not copied again; two identical
messages in the source (a multiset, not a set) give two in the target. BOX2 being live
(new mail arriving in its INBOX) does not matter: extra target messages are simply ignored.

Rules kept for every message: same folder name (created on demand), same flags, same
INTERNALDATE, the bytes verified against the listed hash before appending (so what lands is
byte-identical to what was listed), one message in memory at a time. The source is only
ever read. After copying, `verify_mailbox` lists both sides again and reports every source
message not present in the target; `verified` is True only when nothing is missing (and
the diary, when copied, holds every source component in at least the source's version).

`on_message(msg, copied)` is called after each message is known to be in the target, so a
caller can keep a manifest; an exception it raises stops the run (nothing is half-written:
the append already completed) and a later run resumes by comparison.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from reconciler.drivers.base import MailSystemDriver, StoredMessage, content_sha256
from reconciler.errors import MailferryError, TemporaryError
from reconciler.mover.calendar import copy_diary, missing_items

OnMessage = Callable[[StoredMessage, bool], None]


@runtime_checkable
class FolderCreator(Protocol):
    """A driver that can create an empty folder (not in the base interface)."""

    def create_folder(self, mailbox_id: str, folder: str) -> None:
        """Create the folder if missing."""


@dataclass
class TransferReport:
    """Outcome of one `copy_mailbox` run."""

    copied: int = 0
    present: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (folder, key, reason)
    bytes_copied: int = 0
    seconds: float = 0.0
    verified: bool = False
    missing: list[tuple[str, str]] = field(default_factory=list)  # (folder, sha256)
    diary_changes: int = 0
    diary_missing: list[str] = field(default_factory=list)  # UIDs


def _target_messages(dst: MailSystemDriver, dst_id: str, folder: str) -> list[StoredMessage]:
    if folder not in dst.list_folders(dst_id):
        return []
    return dst.list_messages(dst_id, folder)


def _copy_folder(
    src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str, folder: str,
    report: TransferReport, on_message: OnMessage | None,
) -> None:
    """Append to the target folder what its multiset of hashes lacks."""
    have = Counter(m.sha256 for m in _target_messages(dst, dst_id, folder))
    source = src.list_messages(src_id, folder)
    if not source and isinstance(dst, FolderCreator):
        dst.create_folder(dst_id, folder)  # keep the user's (empty) folder structure
    for msg in source:
        if have[msg.sha256] > 0:
            have[msg.sha256] -= 1
            report.present += 1
            if on_message:
                on_message(msg, False)
            continue
        try:
            data = src.read_message(src_id, folder, msg.key)
        except TemporaryError:
            raise  # the source is down: stop, the next run resumes
        except (MailferryError, OSError) as exc:
            # Expunged by its user since the listing, or unreadable: report, go on.
            report.failed.append((folder, msg.key, f"read failed: {exc}"))
            continue
        if content_sha256(data) != msg.sha256:
            report.failed.append((folder, msg.key, "changed since listing"))
            continue
        dst.append_message(dst_id, folder, data, flags=msg.flags, internal_date=msg.internal_date)
        report.copied += 1
        report.bytes_copied += len(data)
        del data  # one message in memory at a time
        if on_message:
            on_message(msg, True)


def verify_mailbox(
    src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str
) -> list[tuple[str, str]]:
    """(folder, sha256) of every source message missing from the target; empty = verified."""
    missing: list[tuple[str, str]] = []
    for folder in src.list_folders(src_id):
        need = Counter(m.sha256 for m in src.list_messages(src_id, folder))
        need.subtract(Counter(m.sha256 for m in _target_messages(dst, dst_id, folder)))
        missing.extend((folder, sha) for sha, n in sorted(need.items()) for _ in range(max(n, 0)))
    return missing


def verify_diary(
    src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str
) -> list[str]:
    """UIDs of source diary components missing (or older) in the target."""
    source = src.read_diary(src_id)
    return [] if source is None else missing_items(source, dst.read_diary(dst_id))


def copy_mailbox(
    src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str, *,
    mail: bool = True, diary: bool = True, on_message: OnMessage | None = None,
) -> TransferReport:
    """Copy what BOX2 lacks from BOX1 (mail and/or diary), then verify both."""
    started = time.monotonic()
    report = TransferReport()
    if mail:
        for folder in src.list_folders(src_id):
            _copy_folder(src, src_id, dst, dst_id, folder, report, on_message)
    if diary:
        report.diary_changes = copy_diary(src, src_id, dst, dst_id)
    report.missing = verify_mailbox(src, src_id, dst, dst_id) if mail else []
    report.diary_missing = verify_diary(src, src_id, dst, dst_id) if diary else []
    report.verified = not report.missing and not report.diary_missing
    report.seconds = time.monotonic() - started
    return report
