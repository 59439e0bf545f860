"""Maildir++ file-level helpers: folder-name encoding, flags, durable writes, hashing.

Why apart from `store`: these rules are pure functions of names and bytes, shared by every
reader of the format and testable without a database. Folder names are encoded as Dovecot
does (IMAP modified UTF-7, RFC 3501 5.1.3), except that a literal "." inside a name is also
encoded, because "." is the Maildir++ hierarchy separator ("Archive/2023" -> ".Archive.2023").
Writes are durable the POSIX way: temp file, fsync, rename, fsync of the directory.
Hashing and Message-ID parsing stream the file, so a 50 MB attachment never sits in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

from mailferry.mail.imap import mutf7
from mailferry.mail.messageid import message_id_of

MAILDIR_FLAGS = "DFPRST"
INBOX = "INBOX"
_HEADER_LIMIT = 256 * 1024  # Message-ID is searched in at most this much header data
_CHUNK = 64 * 1024
counter = itertools.count()  # unique suffixes for file names within this process


class BadFolderName(ValueError):
    """A folder name that cannot be mapped to a Maildir++ directory."""


def folder_dirname(folder: str) -> str:
    """Maildir++ directory name of a folder ('' for INBOX, '.Archive.2023' for Archive/2023)."""
    if folder.upper() == INBOX:
        return ""
    parts = folder.split("/")
    if any(not p for p in parts):
        raise BadFolderName(f"bad folder name {folder!r}")
    return "." + ".".join(mutf7.encode(p, also=".") for p in parts)


def folder_from_dirname(dirname: str) -> str:
    """Folder name of a Maildir++ directory name (inverse of `folder_dirname`)."""
    return "/".join(mutf7.decode(p) for p in dirname[1:].split("."))


def normalize_flags(flags: str) -> str:
    """Keep the standard Maildir flag letters, sorted and without duplicates."""
    return "".join(sorted({c for c in flags if c in MAILDIR_FLAGS}))


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(counter)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ContentHash:
    """SHA-256 of a message with every CRLF read as LF, fed in chunks.

    Why line endings are not hashed: IMAP always transports CRLF while Maildir files (ours,
    Dovecot's) may hold bare LF, so the same message copied through IMAP must keep the same
    digest, or the mover would see it missing and copy it again. Same value as
    `reconciler.drivers.base.content_sha256`."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._cr = False  # the previous chunk ended with CR: held back

    def update(self, chunk: bytes) -> None:
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        self._digest.update(chunk.replace(b"\r\n", b"\n"))

    def hexdigest(self) -> str:
        if self._cr:
            self._digest.update(b"\r")
            self._cr = False
        return self._digest.hexdigest()


def hash_file(path: Path) -> tuple[str, int, str | None]:
    """(content hash, size, Message-ID) of a message file, read in chunks (no whole-file memory)."""
    digest = ContentHash()
    head = bytearray()
    size = 0
    header_done = False
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if not header_done:
                head += chunk
                # Only the header section is parsed; stop collecting at the blank line.
                for sep in (b"\r\n\r\n", b"\n\n"):
                    pos = head.find(sep)
                    if pos >= 0:
                        del head[pos + len(sep):]
                        header_done = True
                        break
                if len(head) > _HEADER_LIMIT:
                    del head[_HEADER_LIMIT:]
                    header_done = True
    return digest.hexdigest(), size, message_id_of(bytes(head))
