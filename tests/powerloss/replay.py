"""What a power cut leaves on disk, rebuilt from fsrecord.c's log (an ALICE/LazyFS-style
model, at the level of file-system calls).

The model (the strict one POSIX promises, no more): after a power cut

- a file's bytes are those it had when its last fsync/fdatasync *started* and that
  fsync *returned* (a write not followed by a completed fsync of the file is gone);
- a name (create, rename, unlink) is as it was when the last fsync of its folder started
  and returned (a new file's name is not durable because the file was synced: its folder
  must be);
- what existed before the recording started is durable (the test takes that snapshot
  after a clean stop).

``crash_points`` yields, for each instant a completed fsync changes the durable state,
the state just before it (and the final one) with the time of that instant: anything
acknowledged before that time must be found after recovery from that state. SQLite's
``-shm`` (its shared-memory index, rebuilt from the WAL at open) is left out.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = struct.Struct("<B3xiqqII")
OPEN, WRITE, TRUNC, SYNC_START, SYNC_DONE, RENAME, UNLINK, MKDIR, RMDIR, CLOSE = range(1, 11)
DIR = object()  # a folder's entry in a namespace


def build(out_dir: Path) -> Path:
    """Compile the shim (cc is on every machine that builds Python wheels)."""
    so = out_dir / "fsrecord.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(so), str(HERE / "fsrecord.c"),
                    "-ldl", "-lpthread"], check=True, capture_output=True, timeout=120)
    return so


@dataclass
class Record:
    op: int
    fd: int
    time_ns: int
    offset: int
    a: bytes
    b: bytes


def parse(log: Path) -> list[Record]:
    data = log.read_bytes()
    records: list[Record] = []
    pos = 0
    while pos + HEADER.size <= len(data):
        op, fd, t, off, alen, blen = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        a = data[pos:pos + alen]
        pos += alen
        b = data[pos:pos + blen]
        pos += blen
        records.append(Record(op, fd, t, off, a, b))
    return records


@dataclass(eq=False)
class File:
    volatile: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    version: int = 0  # of the volatile bytes (the model's sequence number of the change)
    durable_version: int = 0


class Model:
    """Volatile and durable file system state while replaying the records."""

    def __init__(self, root: Path, snapshot: Path | None = None) -> None:
        """`root`: the folder the shim recorded; `snapshot`: a copy of it as it was when
        the recording started (default: root itself, read now)."""
        self.root = str(root.resolve())
        source = str((snapshot or root).resolve())
        self.volatile: dict[str, File | object] = {self.root: DIR}
        for dirpath, dirnames, filenames in os.walk(source):
            here = os.path.join(self.root, os.path.relpath(dirpath, source)).rstrip("/.")
            here = here if here else self.root
            for d in dirnames:
                self.volatile[os.path.normpath(os.path.join(here, d))] = DIR
            for f in filenames:
                content = Path(dirpath, f).read_bytes()
                self.volatile[os.path.normpath(os.path.join(here, f))] = File(
                    bytearray(content), content)
        self.durable = dict(self.volatile)
        # Versions: an fsync that started later may return earlier; what it made durable
        # must not be undone by the older one returning after it.
        self.seq = 0
        self.name_version: dict[str, int] = {}  # last change of each name (volatile)
        self.durable_name_version: dict[str, int] = {}
        self.fds: dict[int, tuple[str, File | object]] = {}
        self.syncing: dict[int, list[object]] = {}  # fd -> snapshots of started fsyncs
        self.lost_writes = 0  # bytes written but not durable at some crash point

    def apply(self, r: Record) -> bool:
        """Apply one record; True if it changed the durable state."""
        if r.op == OPEN:
            path = r.a.decode()
            node = self.volatile.get(path)
            if node is None:
                # A successful open of a name the model does not know without O_CREAT
                # can only be a folder (the root, opened to fsync it).
                node = self.volatile[path] = File() if r.offset & os.O_CREAT else DIR
                self._named(path)
            elif isinstance(node, File) and r.offset & os.O_TRUNC:
                del node.volatile[:]
                node.version = self._next()
            self.fds[r.fd] = (path, node)
        elif r.op in (WRITE, TRUNC, SYNC_START) and r.fd not in self.fds:
            return False  # not opened under the root
        elif r.op == WRITE:
            node = self.fds[r.fd][1]
            assert isinstance(node, File)
            end = r.offset + len(r.a)
            if len(node.volatile) < r.offset:
                node.volatile.extend(bytes(r.offset - len(node.volatile)))
            node.volatile[r.offset:end] = r.a
            node.version = self._next()
        elif r.op == TRUNC:
            node = self.fds[r.fd][1]
            assert isinstance(node, File)
            del node.volatile[r.offset:]
            if len(node.volatile) < r.offset:
                node.volatile.extend(bytes(r.offset - len(node.volatile)))
            node.version = self._next()
        elif r.op == SYNC_START:
            path, node = self.fds[r.fd]
            snapshot: object
            if isinstance(node, File):
                snapshot = (node, (bytes(node.volatile), node.version))
            else:  # a folder: its entries (and names gone) as they are now
                prefix = path.rstrip("/") + "/"
                snapshot = (path, {p: (self.volatile.get(p), v)
                                   for p, v in self.name_version.items()
                                   if p.startswith(prefix) and "/" not in p[len(prefix):]})
            self.syncing.setdefault(r.fd, []).append(snapshot)
        elif r.op == SYNC_DONE:
            started = self.syncing.get(r.fd)
            if not started:
                return False
            snapshot = started.pop(0)
            assert isinstance(snapshot, tuple)
            target, state = snapshot
            if isinstance(target, File):
                content, version = state
                if version > target.durable_version:
                    target.durable, target.durable_version = content, version
            else:
                for p, (node, version) in state.items():
                    if node is DIR or version <= self.durable_name_version.get(p, 0):
                        continue
                    self.durable_name_version[p] = version
                    if node is None:
                        self.durable.pop(p, None)
                    else:
                        self.durable[p] = node
            return True
        elif r.op == RENAME:
            old, new = r.a.decode(), r.b.decode()
            if old and old in self.volatile:
                node = self.volatile.pop(old)
                self._named(old)
                if new:
                    self.volatile[new] = node
                    self._named(new)
        elif r.op == UNLINK:
            self.volatile.pop(r.a.decode(), None)
            self._named(r.a.decode())
        elif r.op == MKDIR:
            self.volatile[r.a.decode()] = DIR
            self.durable.setdefault(r.a.decode(), DIR)  # folders: see the module doc
        elif r.op == CLOSE:
            self.fds.pop(r.fd, None)
        return False

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _named(self, path: str) -> None:
        self.name_version[path] = self._next()

    def materialize(self, target: Path, only: tuple[str, ...] = ()) -> None:
        """Write the durable state under `target` (its paths relative to the root)."""
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for path, node in sorted(self.durable.items(), key=lambda item: item[0]):
            rel = os.path.relpath(path, self.root)
            if only and not rel.startswith(only):
                continue
            if rel.endswith("-shm"):
                continue
            out = target / rel
            if node is DIR:
                out.mkdir(parents=True, exist_ok=True)
            else:
                assert isinstance(node, File)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(node.durable)

    def undurable_bytes(self) -> int:
        """Bytes written that a power cut now would lose (the model is not a no-op)."""
        lost = 0
        for path, node in self.volatile.items():
            if isinstance(node, File):
                if self.durable.get(path) is not node:
                    lost += len(node.volatile)
                elif bytes(node.volatile) != node.durable:
                    lost += abs(len(node.volatile) - len(node.durable)) or 1
        return lost


def crash_points(model: Model, records: list[Record]) -> Iterator[tuple[float, int]]:
    """(time in seconds of CLOCK_MONOTONIC, undurable bytes) for each crash point: the
    model holds the durable state of that point while the caller looks at it."""
    for r in records:
        if r.op == SYNC_DONE and r.fd in model.syncing and model.syncing[r.fd]:
            yield r.time_ns / 1e9, model.undurable_bytes()
        model.apply(r)
    yield float("inf"), model.undurable_bytes()
