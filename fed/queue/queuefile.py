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
footer or a wrong checksum, whatever the file system did: start-up removes it. Anything
else that goes wrong reading a file (it cannot be opened or read, its envelope makes no
sense) is *not* proof that it was never acknowledged: ``BadQueueFile.torn`` tells the two
apart, and the spool quarantines the second kind (``spool.py``). Delivery reads a file
through the same checks, so a file corrupted on disk is never relayed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fed.queue")

FOOTER_LEN = 41
EMPTY = "empty (an unused blank, or created and never written)"
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


def new_queue_id() -> str:
    """A sortable, unique queue id: microseconds since the epoch + randomness, in hex."""
    # random, not secrets: uniqueness is all a queue id needs, and urandom is a syscall.
    return f"{time.time_ns() // 1000:014X}{random.getrandbits(24):06X}"


def content_end(fd: int) -> int:
    """Where a queue file's content ends: its size, less the zero bytes after the last
    non-zero one (the unused rest of a blank)."""
    total = os.fstat(fd).st_size
    if total == 0 or os.pread(fd, 1, total - 1) != b"\0":
        return total
    end = total
    while end > 0:
        start = max(0, end - (1 << 16))
        chunk = os.pread(fd, end - start, start)
        stripped = chunk.rstrip(b"\0")
        if stripped:
            return start + len(stripped)
        end = start
    return 0


def crc_of(parts: Iterable[bytes]) -> int:
    """CRC-32 of the concatenation of `parts`."""
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return value


_json_str = json.encoder.encode_basestring_ascii  # the C escaper of json.dumps' strings


def envelope_json(envelope: Envelope) -> bytes:
    """The envelope as ``json.dumps(..., separators=(",", ":"))`` writes it, byte for byte
    (tests/test_fed_units.py compares them), without building a dict and an encoder: that
    was 1-2 % of fed's CPU a message."""
    rcpts = ",".join(map(_json_str, envelope.rcpts))
    message_id = "null" if envelope.message_id is None else _json_str(envelope.message_id)
    return (f'{{"queue_id":{_json_str(envelope.queue_id)},'
            f'"mail_from":{_json_str(envelope.mail_from)},"rcpts":[{rcpts}],'
            f'"message_id":{message_id},'
            f'"received_at":{_json_number(envelope.received_at)}}}').encode()


def _json_number(value: float) -> str:
    """A number as json.dumps writes it (``float.__repr__`` for a finite float)."""
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)


def trailer(envelope: Envelope, message_crc: int) -> bytes:
    """What follows the message bytes in its queue file."""
    body = envelope_json(envelope)
    crc = zlib.crc32(body, message_crc)
    return body + b"\nFED1 %016x %08x %08x\n" % (envelope.size, len(body), crc)


class BadQueueFile(Exception):
    """A queue file that is not what fed wrote and synced.

    ``torn`` is True when the file is exactly what a crash before the fsync leaves (no
    valid footer, or a checksum that does not match): such a file was never acknowledged.
    False means a complete file whose content makes no sense (a checksum that matches over
    an envelope that does not parse): never the result of a crash, so never deleted.
    """

    def __init__(self, path: Path, reason: str, torn: bool) -> None:
        super().__init__(f"{path.name}: {reason}")
        self.reason = reason
        self.torn = torn


def _footer(fd: int, path: Path) -> tuple[int, int, int]:
    """(message size, envelope size, crc) from the footer; BadQueueFile(torn) if none."""
    total = content_end(fd)
    if total == 0:
        raise BadQueueFile(path, EMPTY, torn=True)
    if total < FOOTER_LEN:
        raise BadQueueFile(path, "no footer (shorter than one)", torn=True)
    match = _FOOTER.match(os.pread(fd, FOOTER_LEN, total - FOOTER_LEN))
    if match is None:
        raise BadQueueFile(path, "no valid footer", torn=True)
    size, env_len, crc = (int(g, 16) for g in match.groups())
    if size + env_len + FOOTER_LEN != total:
        raise BadQueueFile(path, f"{total} bytes where the footer says "
                           f"{size + env_len + FOOTER_LEN}", torn=True)
    return size, env_len, crc


def _read_checked(fd: int, path: Path, size: int, env_len: int, crc: int
                  ) -> tuple[bytes, bytes]:
    """(message, envelope) bytes, their CRC verified (BadQueueFile(torn) on a mismatch).
    The message is read in pieces and joined once (no further copy of a big message)."""
    chunks: list[bytes] = []
    value, got = 0, 0
    while got < size:
        chunk = os.pread(fd, min(1 << 22, size - got), got)
        if not chunk:
            raise BadQueueFile(path, "shorter than its footer says", torn=True)
        value = zlib.crc32(chunk, value)
        chunks.append(chunk)
        got += len(chunk)
    envelope = os.pread(fd, env_len, size)
    if len(envelope) != env_len:
        raise BadQueueFile(path, "shorter than its footer says", torn=True)
    value = zlib.crc32(envelope, value)
    if value != crc:
        raise BadQueueFile(path, f"checksum mismatch (crc32 {value:08x}, footer says "
                           f"{crc:08x})", torn=True)
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), envelope


def _parse_envelope(path: Path, raw_json: bytes, size: int) -> Envelope:
    try:
        raw = json.loads(raw_json)
        return Envelope(str(raw["queue_id"]), str(raw["mail_from"]),
                        tuple(str(r) for r in raw["rcpts"]),
                        None if raw["message_id"] is None else str(raw["message_id"]),
                        float(raw["received_at"]), size)
    except (ValueError, KeyError, TypeError) as exc:
        raise BadQueueFile(path, f"envelope does not parse: {exc!r}", torn=False) from exc


def read_queue_file(path: Path) -> tuple[Envelope, bytes]:
    """Envelope and message bytes of a queue file, its checksum verified.

    Raises BadQueueFile (see ``torn``) for a file that is not a complete queue file and
    OSError when the file cannot be read at all (EMFILE, EIO, EACCES, ...): the caller
    must never take the latter for "never acknowledged".
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size, env_len, crc = _footer(fd, path)
        message, raw_envelope = _read_checked(fd, path, size, env_len, crc)
    finally:
        os.close(fd)
    return _parse_envelope(path, raw_envelope, size), message


def read_message(path: Path) -> bytes:
    """The message bytes of a queue file (checksum verified; see read_queue_file)."""
    return read_queue_file(path)[1]


def read_envelope(path: Path) -> Envelope:
    """The envelope of a queue file (checksum verified; see read_queue_file).

    Reads the file in pieces without keeping them: start-up checks every file it does not
    know, and a big message need not be in memory for that.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size, env_len, crc = _footer(fd, path)
        value, offset = 0, 0
        while offset < size + env_len:
            chunk = os.pread(fd, min(1 << 20, size + env_len - offset), offset)
            if not chunk:
                raise BadQueueFile(path, "shorter than its footer says", torn=True)
            value = zlib.crc32(chunk, value)
            offset += len(chunk)
        if value != crc:
            raise BadQueueFile(path, f"checksum mismatch (crc32 {value:08x}, footer says "
                               f"{crc:08x})", torn=True)
        raw_json = os.pread(fd, env_len, size)
    finally:
        os.close(fd)
    return _parse_envelope(path, raw_json, size)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of `data` from `offset`, however short each pwrite."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def try_fsync(fd: int) -> OSError | None:
    """fsync `fd`, returning the error instead of raising it: the spool's and the blanks'
    sync rounds run many from a pool and answer each message by its own outcome."""
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


def try_fdatasync(fd: int) -> OSError | None:
    """`try_fsync` for a file whose size and blocks are durable already (a blank)."""
    try:
        os.fdatasync(fd)
    except OSError as exc:
        return exc
    return None


def remove_file(file: Path) -> None:
    """Unlink a queue file if it is there; a failure is logged, not raised (the spool
    removes files in batches, and one that stays is found again at start)."""
    try:
        file.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", file, exc)
