"""The Message-ID of a message: the one extraction fed, the mover, the drivers and the
maildir system share (every message is counted by it, DESIGN.md).

``message_id_of`` takes a whole message or only its header section (a Maildir file's first
bytes, an IMAP ``BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]`` answer), with CRLF or bare LF line
ends. Only the header section is read. The everyday case (ASCII, CRLF, every line a
``Name: value`` or a continuation, the Message-ID on one line) is read with two regular
expressions: email's parser costs 2 % of fed's CPU per message. Anything else goes to the
parser (``email.policy.compat32``, which never raises on garbage), whose answer this is
(tests/test_fed_units.py compares both on odd headers). The value is stripped, cut at 998
characters (RFC 5322's line limit) and None when the header is missing or empty; bytes that
are not ASCII read as Latin-1 (as the mover always did), so that the result can always be
stored and compared.
"""

from __future__ import annotations

import re

MAX_LENGTH = 998
# A header section email's parser reads as header fields only: "Name:" lines (the name in
# the parser's own character class) and their continuation lines, all ending in CRLF.
_HEADER_SECTION = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r\n|[ \t][^\r\n]*\r\n)*")
_MESSAGE_ID_LINE = re.compile(rb"^message-id:[ \t]*([^\r\n]*)\r\n", re.IGNORECASE | re.MULTILINE)


def header_section(data: bytes) -> bytes:
    """The header section of a message: up to and including the blank line (CRLF or LF);
    the whole data when there is no blank line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = data.find(sep)
        if pos >= 0:
            return data[:pos + len(sep)]
    return data


def message_id_of(data: bytes) -> str | None:
    """The Message-ID header of a message or header section, None if missing or empty."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return message_id_parsed(header_section(data))
    head = data[:end + 2]
    if head.isascii() and _HEADER_SECTION.fullmatch(head):
        found = _MESSAGE_ID_LINE.search(head)
        if found is None:
            return None
        if not head.startswith((b" ", b"\t"), found.end()):
            return found.group(1).decode("ascii").strip()[:MAX_LENGTH] or None
    return message_id_parsed(data[:end])


def message_id_parsed(head: bytes) -> str | None:
    """`message_id_of` through email's parser only (the reference the fast path matches)."""
    # Imported here: the fast path above answers the everyday header, and a process that
    # parses none (a no-op `mover copy`) skips email's parser modules.
    import email.parser
    import email.policy

    # Read as Latin-1 text: every byte maps to one character, so an 8-bit Message-ID keeps
    # its bytes (the bytes parser would turn them into U+FFFD) and ASCII parses as before.
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    value = parser.parsestr(head.decode("latin-1")).get("Message-ID")
    if value is None:
        return None
    return str(value).strip()[:MAX_LENGTH] or None
