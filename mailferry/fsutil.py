"""File-system durability shared by the tools: syncing what a path names."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync the file or folder at `path`; a folder, so that a rename or link made in it
    survives a crash (the new name is in the folder's data, not the file's)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of `data` at the file position, however short each write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
