"""Crash-safe file writes for the station agent.

Why. The agent runs on a workstation that users switch off by holding the power button. Its
results (reports in the outbox), its memory of what it already uploaded (the manifest) and the
user's mail client profile must never be found half-written after such a stop: a truncated
profile means a mail client that no longer starts, a truncated report means a lost result.
Every write therefore goes to a temporary file in the same directory, is fsynced, and is
renamed over the destination (atomic on POSIX and on NTFS via os.replace); the directory is
fsynced too where the platform allows it, so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Persist a directory entry change (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on a directory
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
