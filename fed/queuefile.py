"""The queue file: the message, then its envelope, then a footer that proves both complete.

Why the envelope lives in the file: acceptance must make the message *and* its envelope
durable before the 250. With the envelope only in SQLite that is two sync rounds in a row
(the file, then the database's WAL); with the envelope in the file it is one (the file and
its folder, concurrently), as in Postfix. The SQLite rows are then an index, committed
without an fsync of their own, that start-up rebuilds from the files when a crash lost it.

Layout of ``queue/<queue id>.eml``::

    <message bytes, exactly as delivered>
    <envelope: one JSON object, UTF-8>
    \\nFED1 <message size: 16 hex> <envelope size: 8 hex> <crc32 of message+envelope: 8 hex>\\n

A file cut short by a crash (written, not yet synced, so never acknowledged) has no valid
footer or a wrong checksum, whatever the file system did: start-up removes it.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FOOTER_LEN = 41
_FOOTER = re.compile(rb"\nFED1 ([0-9a-f]{16}) ([0-9a-f]{8}) ([0-9a-f]{8})\n\Z")


@dataclass(frozen=True)
class Envelope:
    """What the SMTP transaction said about a message, and when it came."""

    queue_id: str
    mail_from: str
    rcpts: tuple[str, ...]
    message_id: str | None
    received_at: float
    size: int


def crc_of(parts: Iterable[bytes]) -> int:
    """CRC-32 of the concatenation of `parts`."""
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return value


def trailer(envelope: Envelope, message_crc: int) -> bytes:
    """What follows the message bytes in its queue file."""
    body = json.dumps({
        "queue_id": envelope.queue_id, "mail_from": envelope.mail_from,
        "rcpts": list(envelope.rcpts), "message_id": envelope.message_id,
        "received_at": envelope.received_at,
    }, separators=(",", ":")).encode()
    crc = zlib.crc32(body, message_crc)
    return body + b"\nFED1 %016x %08x %08x\n" % (envelope.size, len(body), crc)


def _footer(fd: int) -> tuple[int, int, int, int] | None:
    """(file size, message size, envelope size, crc) from the footer, or None."""
    total = os.fstat(fd).st_size
    if total < FOOTER_LEN:
        return None
    match = _FOOTER.match(os.pread(fd, FOOTER_LEN, total - FOOTER_LEN))
    if match is None:
        return None
    size, env_len, crc = (int(g, 16) for g in match.groups())
    if size + env_len + FOOTER_LEN != total:
        return None
    return total, size, env_len, crc


def read_message(path: Path) -> bytes:
    """The message bytes of a queue file (without envelope and footer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        footer = _footer(fd)
        if footer is None:
            raise OSError(f"{path.name}: not a complete queue file")
        size = footer[1]
        chunks: list[bytes] = []
        got = 0
        while got < size:
            chunk = os.pread(fd, size - got, got)
            if not chunk:
                raise OSError(f"{path.name}: shorter than its footer says")
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def read_envelope(path: Path) -> Envelope | None:
    """The envelope of a complete queue file (checksum verified), or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        footer = _footer(fd)
        if footer is None:
            return None
        _, size, env_len, crc = footer
        value, offset = 0, 0
        while offset < size + env_len:
            chunk = os.pread(fd, min(1 << 20, size + env_len - offset), offset)
            if not chunk:
                return None
            value = zlib.crc32(chunk, value)
            offset += len(chunk)
        if value != crc:
            return None
        raw = json.loads(os.pread(fd, env_len, size))
        return Envelope(str(raw["queue_id"]), str(raw["mail_from"]),
                        tuple(str(r) for r in raw["rcpts"]),
                        None if raw["message_id"] is None else str(raw["message_id"]),
                        float(raw["received_at"]), size)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
