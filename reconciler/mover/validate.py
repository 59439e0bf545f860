"""Validate the source mailbox before taking its data (patent E11-E12).

Why before and not during: a migration that copies a corrupt message silently carries the
corruption into BOX2, and one that stops half-way on it leaves the user with a partial
mailbox. The patent's "integration of data of the first system" mode checks BOX1 first; a
non-empty list of findings lets the engine freeze the migration with a readable reason (or
the admin choose the mode without validation) before anything is written.

Checks, per message: it can be read; what is read has the size and hash the listing gave
(and the ``S=<size>`` of a Maildir file name, when present, agrees); its header section
parses: at least one header field, every line a ``Name: value`` field or a continuation,
no NUL byte. The body is not judged: MIME damage there is the user's data, copied as is.
"""

from __future__ import annotations

import re

from reconciler.drivers.base import MailSystemDriver, StoredMessage, content_sha256
from reconciler.errors import MailferryError, TemporaryError

_FIELD = re.compile(rb"^[!-9;-~]+[ \t]*:")
_MAILDIR_SIZE = re.compile(r",S=(\d+)")


def header_problem(data: bytes) -> str | None:
    """Why the header section of a message does not parse, or None."""
    end = len(data)
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = data.find(sep)
        if 0 <= pos < end:
            end = pos
    head = data[:end]
    if b"\0" in head:
        return "NUL byte in header"
    lines = head.splitlines()
    if not lines or not _FIELD.match(lines[0]):
        return "does not start with a header field"
    for number, line in enumerate(lines, 1):
        if not (line[:1] in (b" ", b"\t") or _FIELD.match(line)):
            return f"header line {number} is neither a field nor a continuation"
    return None


def _check(driver: MailSystemDriver, mailbox_id: str, msg: StoredMessage) -> str | None:
    try:
        data = driver.read_message(mailbox_id, msg.folder, msg.key)
    except TemporaryError:
        raise
    except (MailferryError, OSError) as exc:
        return f"unreadable: {exc}"
    if len(data) != msg.size:
        return f"size {len(data)} read, {msg.size} listed"
    if content_sha256(data) != msg.sha256:
        return "content differs from listing"
    named = _MAILDIR_SIZE.search(msg.key)
    if named and int(named.group(1)) != len(data):
        return f"file name says S={named.group(1)}, file has {len(data)} bytes"
    return header_problem(data)


def validate_source(driver: MailSystemDriver, mailbox_id: str) -> list[str]:
    """Every finding as 'folder/key: reason'; an empty list means the mailbox is valid."""
    problems: list[str] = []
    for folder in driver.list_folders(mailbox_id):
        try:
            messages = driver.list_messages(mailbox_id, folder)
        except TemporaryError:
            raise
        except (MailferryError, OSError) as exc:
            problems.append(f"{folder}: cannot list: {exc}")
            continue
        for msg in messages:
            problem = _check(driver, mailbox_id, msg)
            if problem:
                problems.append(f"{folder}/{msg.key}: {problem}")
    return problems
