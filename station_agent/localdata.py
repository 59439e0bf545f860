"""The user's local mail (E30): finding mbox files, reading their messages, remembering uploads.

Why. Mail that lives only on the workstation -- Thunderbird's "Local Folders", archives moved
off the server years ago -- is not in BOX1, so the data mover cannot copy it; the patent has
the user station transfer it to BOX2 (E30). Thunderbird stores each local folder as an mbox
file without extension (with a `.msf` index beside it, and subfolders in `<name>.sbd/`), so
"an mbox file" is recognised by content (it starts with `From `), not by name; indexes and
other files are ignored. Each file becomes the target folder `Local Folders/<name>` (nested
`.sbd` folders become `Local Folders/<parent>/<name>`); a POP3 account's own folders go under
a folder named for the account, or, with an empty prefix, into the mailbox itself (its
`Inbox` is then the INBOX). Thunderbird's tags (`X-Mozilla-Keys`) travel as IMAP keywords.

Messages are read with the standard library's `mailbox.mbox` and sent as their raw bytes, so
BOX2 receives exactly what the user had. Messages Thunderbird marked expunged
(`X-Mozilla-Status` bit 0x0008) but has not compacted away yet are deleted mail: skipped.
Flags become Maildir letters (read S, answered R, flagged F, deleted T).

The manifest (`<state-dir>/manifest-<migration id>.txt`, one `sha256<TAB>folder` line per
message the API acknowledged, appended and fsynced) is what makes a re-run upload nothing
twice without even asking the API; the API's own SHA-256 check covers a crash between an
upload and its manifest line.
"""

from __future__ import annotations

import email.utils
import hashlib
import mailbox
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from station_agent.fsutil import fsync_dir

LOCAL_ROOT = "Local Folders"
MOZ_EXPUNGED = 0x0008
MOZ_READ, MOZ_REPLIED, MOZ_MARKED = 0x0001, 0x0002, 0x0004


@dataclass(frozen=True)
class LocalMessage:
    """One message of a local mbox, ready to upload."""

    folder: str
    data: bytes
    flags: str
    internal_date: float | None
    sha256: str
    keywords: tuple[str, ...] = ()  # Thunderbird's tags ($label1..5, user tags)


def _looks_like_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(5)
    except OSError:
        return False
    # An empty file is an empty Thunderbird folder: still a folder, with nothing to send.
    return head in (b"", b"From ")


def mbox_files(root: Path, prefix: str = LOCAL_ROOT) -> list[tuple[str, Path]]:
    """(target folder under `prefix`, path) of every mbox file under `root`, by folder."""
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        return found
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        here = Path(directory)
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or path.suffix.lower() in (".msf", ".dat", ".json", ".html",
                                                                ".tmp", ".bak"):
                continue
            if not path.is_file() or not _looks_like_mbox(path):
                continue
            parts = [part.removesuffix(".sbd") for part in path.relative_to(root).parent.parts]
            stem = path.stem if path.suffix.lower() == ".mbox" else path.name
            names = [*parts, stem]
            if not prefix and names[0].lower() == "inbox":
                names[0] = "INBOX"  # merged into the mailbox itself: its Inbox is the INBOX
            found.append(("/".join([prefix, *names] if prefix else names), path))
    return sorted(found)


def local_bytes(root: Path, prefix: str = LOCAL_ROOT) -> int:
    """The size of the local mail: the sum of the mbox files' sizes."""
    return sum(path.stat().st_size for _folder, path in mbox_files(root, prefix))


def _flags(message: mailbox.mboxMessage) -> str:
    letters = set(mailbox.MaildirMessage(message).get_flags())
    moz = _moz_status(message)
    if moz is not None:
        if moz & MOZ_READ:
            letters.add("S")
        if moz & MOZ_REPLIED:
            letters.add("R")
        if moz & MOZ_MARKED:
            letters.add("F")
    return "".join(sorted(letters & set("DFPRST")))


def _keywords(message: mailbox.mboxMessage) -> tuple[str, ...]:
    """Thunderbird's tags of a local message: the keys of its `X-Mozilla-Keys` header.

    Thunderbird stores a local message's tags in that header, space-separated and padded
    with spaces it keeps for rewriting in place: `$label1` ... `$label5` (Important, Work,
    Personal, To Do, Later) and the keys of the user's own tags (`mailnews.tags.<key>.tag`).
    On IMAP Thunderbird reads the very same keys as keywords, so they are sent as they
    are. A key that is not a valid IMAP atom (RFC 3501 `flag-keyword`) cannot be stored as
    a keyword: it is left out (and logged by the uploader), the message still goes.
    """
    found: list[str] = []
    for value in message.get_all("X-Mozilla-Keys") or []:
        for key in str(value).split():
            if key not in found:
                found.append(key)
    return tuple(found)


def valid_keyword(key: str) -> bool:
    """True if `key` can be an IMAP keyword (an atom, not a system flag)."""
    return bool(key) and not key.startswith("\\") and all(
        0x21 <= ord(ch) <= 0x7E and ch not in '(){%*"\\]' for ch in key)


def _moz_status(message: mailbox.mboxMessage) -> int | None:
    value = message.get("X-Mozilla-Status")
    if value is None:
        return None
    try:
        return int(str(value).strip(), 16)
    except ValueError:
        return None


def _internal_date(message: mailbox.mboxMessage) -> float | None:
    # The "From " line carries the delivery time (asctime format); the Date: header is the
    # sender's claim and only a fallback.
    _sender, _, stamp = message.get_from().partition(" ")
    try:
        return float(time.mktime(time.strptime(" ".join(stamp.split()), "%a %b %d %H:%M:%S %Y")))
    except (ValueError, OverflowError):
        pass
    header = message.get("Date")
    if header is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(str(header)).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def iter_messages(root: Path, prefix: str = LOCAL_ROOT
                  ) -> Iterator[LocalMessage | tuple[str, str]]:
    """Every message under `root`; an expunged one is yielded as ("expunged", folder)."""
    for folder, path in mbox_files(root, prefix):
        box = mailbox.mbox(path, create=False)
        try:
            for key in box.iterkeys():
                message = box.get_message(key)
                moz = _moz_status(message)
                if moz is not None and moz & MOZ_EXPUNGED:
                    yield ("expunged", folder)
                    continue
                data = box.get_bytes(key)
                yield LocalMessage(folder=folder, data=data, flags=_flags(message),
                                   internal_date=_internal_date(message),
                                   sha256=hashlib.sha256(data).hexdigest(),
                                   keywords=_keywords(message))
        finally:
            box.close()


class Manifest:
    """The (sha256, folder) pairs already acknowledged by the API for one migration."""

    def __init__(self, state_dir: Path, migration_id: int) -> None:
        self.path = state_dir / f"manifest-{migration_id}.txt"
        self._seen: set[tuple[str, str]] = set()
        self._intended: set[tuple[str, str]] = set()
        if self.path.exists():
            *lines, torn = self.path.read_text(encoding="utf-8").split("\n")
            for line in lines:
                digest, sep, folder = line.partition("\t")
                if sep and digest.startswith("?"):
                    self._intended.add((digest[1:], folder))
                elif sep:
                    self._seen.add((digest, folder))
            if torn:
                # A power cut mid-append left an unterminated line: not counted, and closed
                # so that the next record starts on a line of its own.
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write("\n")

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self._seen

    def uncertain(self, digest: str, folder: str) -> bool:
        """True if an upload of this message began but was never acknowledged (a crash)."""
        return (digest, folder) in self._intended and (digest, folder) not in self._seen

    def intend(self, digest: str, folder: str) -> None:
        """Record, durably, that an upload is about to start (`?sha<TAB>folder`)."""
        self._append(f"?{digest}\t{folder}\n")
        self._intended.add((digest, folder))

    def add(self, digest: str, folder: str) -> None:
        """Record one acknowledged upload durably."""
        if (digest, folder) in self._seen:
            return
        self._append(f"{digest}\t{folder}\n")
        self._seen.add((digest, folder))

    def _append(self, line: str) -> None:
        new = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            fsync_dir(self.path.parent)
