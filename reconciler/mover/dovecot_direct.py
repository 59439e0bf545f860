"""A Dovecot on this host as a copy's target: big messages written into its Maildir, as
dsync writes them.

Why: through IMAP a Dovecot target spends more CPU on a big message than the rest of the
copy. On the 680 MB benchmark (`AVG_SIZE=8000000 bench/mover_vs_mbsync.sh 4 20`, 80
messages of 4-12 MB) the target Dovecot took 1.37-1.41 CPU-s for the APPENDs and the
read-back proof, the mover 2.0 and the source 0.5, where `doveadm backup` (the peer)
writes the target's Maildir itself. When the mover runs on the mail host (as adopting an
admin's Postfix + Dovecot has the reconciler do) it can do the same: a message streamed
from the source (over `Options.stream_over`, 1 MiB) becomes a file of the target's
Maildir; everything else stays IMAP (folders, listings, UIDs, the small messages'
MULTIAPPEND, messages with keywords). Small messages gain nothing this way: a file and its
fdatasync each, where one MULTIAPPEND carries a batch (measured: 1,330-1,490 messages/s
against 2,600-3,700 over IMAP on 20 x 500).

What Dovecot is asked, before anything is written (`DovecotLayout.check`), with its own
tools and the admin's configuration (`doveadm -c CONF`, `doveconf -c CONF`): the user's
mail location (userdb's ``mail``, else ``mail_location``) must be ``maildir:``; every mail
plugin, global, for IMAP, LMTP and LDA and the user's own, must be one that leaves a
message file as it was written and keeps no account of what a folder holds
(`SAFE_PLUGINS`: not zlib, mail_crypt, quota, ...); each folder's directory is the one
`doveadm mailbox path` names, with ``cur``, ``new`` and ``tmp`` in it. Anything else: the
mailbox's big messages go over IMAP like the rest, and a warning says why
(`DirectWriteRefused`'s reason); nothing is written into the Maildir.

How a message is written (Maildir's protocol, as Dovecot's own save does): a new file in
``tmp/`` (O_EXCL, the mode and owner of the folder's ``cur/``), the bytes as the source
serves them, chunk by chunk as they arrive (memory: a chunk), ``fdatasync``, its
modification time set to the INTERNALDATE (Dovecot's Maildir reads it as the received
date), then a hard link into ``cur/`` as ``BASE,S=size,W=vsize:2,FLAGS`` (a link never
replaces a file of that name; a rename would), the ``tmp/`` name removed and ``cur/``
fsynced before the copy counts as stored. Dovecot numbers the file when it next looks at
the folder (the EXAMINE that follows); its UID is found by `X-GUID`, which for a Maildir
file is its base name.

The proof: `read_back` reads the file this process wrote and hashes it, as the IMAP path
hashes what a server returns, and the pipeline judges it the same way. Dovecot serves a
Maildir file byte for byte (no plugin in between: `check` made sure). A UID this process
did not write (a re-run's, another client's, a small message's) is read back over IMAP.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailferry.fsutil import fsync_path, write_all
from mailferry.mail.imap import flags as maildir_flags
from mailferry.mail.imap import mutf7
from mailferry.mail.imap.client import Digest, Untagged, WireHash, fetch_items
from mailferry.mail.imap.dates import epoch_of
from mailferry.mail.imap.quoting import quote_mailbox
from reconciler.drivers.base import ImapAccount
from reconciler.drivers.hosts import HostError, LocalHost
from reconciler.mover.endpoints import (
    DIGEST_OVER,
    AppendResult,
    ImapEndpoint,
    Sink,
)
from reconciler.mover.pace import SystemPace
from reconciler.mover.pool import ConnectionPool

# Plugins that leave a Maildir file as written and keep no tally of a folder's contents:
# full-text search indexes (built from the messages later), ACLs, logs, statistics,
# notifications, lazy expunge, virtual folders, IMAP's wire compression. zlib and
# mail_compress store compressed files, mail_crypt encrypted ones, quota keeps a count
# that a file written past it would make wrong: with any of those, or any other, refused.
SAFE_PLUGINS = frozenset({
    "acl", "imap_acl", "fts", "fts_lucene", "fts_solr", "fts_squat", "fts_flatcurve",
    "lazy_expunge", "listescape", "mail_log", "notify", "old_stats", "stats", "virtual",
    "imap_zlib", "push_notification", "last_login", "imap_sieve", "sieve",
})
# IMAP flags a Maildir file name carries itself: the system flags of the one map (Dovecot
# reads no P as $Forwarded); a keyword ($Forwarded included) lives in Dovecot's
# dovecot-keywords under its lock: IMAP.
_LETTERS = {flag: letter for flag, letter in maildir_flags.IMAP_TO_MAILDIR.items()
            if flag.startswith("\\")}
_CHUNK = 1 << 20
log = logging.getLogger("mailferry.mover.dovecot")
_COUNTER = itertools.count(1)
_DOVEADM_TIMEOUT = 60.0
_HERE = LocalHost()  # doveadm and doveconf run where the Maildir is: this machine


class DirectWriteRefused(Exception):
    """The target Dovecot's configuration does not let its Maildir be written directly
    (the endpoint then copies over IMAP)."""


def letters(flags: Sequence[str]) -> str | None:
    """The Maildir letters for these flags (sorted), or None if one is a keyword."""
    out = set()
    for flag in flags:
        lowered = flag.lower()
        if lowered == "\\recent":
            continue
        letter = _LETTERS.get(lowered)
        if letter is None:
            return None
        out.add(letter)
    return "".join(sorted(out))


def new_base() -> str:
    """A Maildir base name in Dovecot's form (time.MusecPpidQn.host), unique on this host."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_COUNTER)}.{host}"


@dataclass
class _Folder:
    path: Path  # the folder's Maildir directory (cur, new, tmp under it)
    uid: int  # owner and group of what is written in it (cur/'s)
    gid: int
    mode: int  # mode of a message file (cur/'s permissions without x)


@dataclass
class _Written:
    base: str
    path: Path  # where it was linked (Dovecot renames it when its flags change)


class DovecotLayout:
    """What Dovecot says of a user's Maildir, from `doveadm` and `doveconf` with the
    admin's configuration file (blocking calls: run them in a thread)."""

    def __init__(self, config: Path, *, doveadm: str = "doveadm",
                 doveconf: str = "doveconf") -> None:
        self.config = config
        self.doveadm = doveadm
        self.doveconf = doveconf
        # doveconf's answers are the same for every mailbox of a run: asked once
        self._settings: dict[tuple[str, str | None], str] = {}
        self._lock = threading.Lock()

    def _run(self, *args: str) -> str:
        try:
            return _HERE.run(args, timeout=_DOVEADM_TIMEOUT)
        except HostError as exc:
            raise DirectWriteRefused(str(exc)) from None

    def _setting(self, name: str, protocol: str | None = None) -> str:
        with self._lock:
            known = self._settings.get((name, protocol))
        if known is None:
            args = [self.doveconf, "-c", str(self.config)]
            if protocol:
                args += ["-f", f"protocol={protocol}"]
            known = self._run(*args, "-h", name).strip()
            with self._lock:
                self._settings[(name, protocol)] = known
        return known

    def user_fields(self, user: str) -> dict[str, str]:
        """The userdb's fields for `user` (`doveadm user`)."""
        out = self._run(self.doveadm, "-c", str(self.config), "user", user)
        fields: dict[str, str] = {}
        for line in out.splitlines()[1:]:  # the first line is "field<TAB>value"
            key, _, value = line.partition("\t")
            fields[key.strip()] = value.strip()
        return fields

    def check(self, user: str) -> None:
        """Raise `DirectWriteRefused` unless `user`'s mail is a Maildir that Dovecot serves
        exactly as written (see the module's docstring)."""
        fields = self.user_fields(user)
        location = fields.get("mail") or self._setting("mail_location")
        if not location.startswith("maildir:"):
            raise DirectWriteRefused(
                f"{user}'s mail location is {location or 'not set'!r}, not a Maildir")
        plugins = set(fields.get("mail_plugins", "").split())
        for protocol in (None, "imap", "lmtp", "lda"):
            plugins |= set(self._setting("mail_plugins", protocol).split())
        unsafe = sorted(plugins - SAFE_PLUGINS)
        if unsafe:
            raise DirectWriteRefused(
                f"mail plugin(s) {', '.join(unsafe)} may store or count a message other than"
                " as written")

    def folder(self, user: str, name: str) -> _Folder:
        """The Maildir directory of `user`'s folder `name` (IMAP name, decoded)."""
        path = Path(self._run(self.doveadm, "-c", str(self.config), "mailbox", "path",
                              "-u", user, name).strip())
        missing = [sub for sub in ("cur", "new", "tmp") if not (path / sub).is_dir()]
        if missing:
            raise DirectWriteRefused(f"{path} is not a Maildir folder (no {missing[0]}/)")
        st = os.stat(path / "cur")
        return _Folder(path, st.st_uid, st.st_gid, st.st_mode & 0o666)


def _finish_file(fd: int, folder: _Folder, date: str | None) -> None:
    """Durable, owned as the folder's files, dated: ready to be linked into cur/."""
    os.fdatasync(fd)
    if os.geteuid() == 0 or os.getuid() != folder.uid:
        os.fchown(fd, folder.uid, folder.gid)
    when = epoch_of(date)
    if when is not None:
        os.utime(fd, (when, when))


@dataclass
class _Streaming:
    """A big message being written as it arrives (`append_stream`)."""

    name: str
    folder: _Folder
    base: str
    flags: str
    date: str | None
    size: int = 0
    error: str | None = None


class DovecotDirectEndpoint(ImapEndpoint):
    """A mailbox on a Dovecot of this host: IMAP for all but the messages' bytes, which
    go straight into its Maildir (see the module's docstring)."""

    def __init__(self, account: ImapAccount, layout: DovecotLayout, *,
                 pool: ConnectionPool | None = None, pace: SystemPace | None = None) -> None:
        super().__init__(account, readonly=False, pool=pool, pace=pace)
        self.layout = layout
        self.label = f"dovecot-direct:{self.owner}@{account.host}:{account.port}"
        self._checked = False
        self.refused: str | None = None  # why this mailbox's big messages go over IMAP
        self.unnumbered = 0  # files Dovecot had not numbered in time: proven over IMAP
        self._dirs: dict[str, _Folder] = {}
        self._written: dict[tuple[str, str], _Written] = {}  # (folder, UID) -> its file

    async def _folder_of(self, name: str) -> _Folder | None:
        """The folder's Maildir directory, or None when this mailbox's big messages go over
        IMAP after all (`check` or the folder refused: said once, as a warning).

        Checked before the mailbox's first file, not at `open`: a mailbox without big
        messages never needs it (a `doveadm user` each: 0.3 CPU-s over the 20 mailboxes of
        the small-message benchmark)."""
        if self.refused is not None:
            return None
        found = self._dirs.get(name)
        if found is None:
            try:
                if not self._checked:
                    await asyncio.to_thread(self.layout.check, self.owner)
                    self._checked = True
                found = await asyncio.to_thread(self.layout.folder, self.owner,
                                                self._native_decoded(name))
            except DirectWriteRefused as exc:
                self._refuse(str(exc))
                return None
            self._dirs[name] = found
        return found

    def _refuse(self, reason: str) -> None:
        """From now on this mailbox's big messages go over IMAP; said once, with why."""
        self.refused = reason
        log.warning("%s: big messages go over IMAP, not into the Maildir: %s", self.label,
                    reason)

    def _native_decoded(self, name: str) -> str:
        # doveadm takes folder names in UTF-8 with the namespace's separator
        return mutf7.decode(self._native(name))

    async def _uidnext(self, name: str) -> int:
        box = quote_mailbox(self._native(name))
        untagged = await self._c().simple((b"STATUS " + box + b" (UIDNEXT)").decode())
        for resp in untagged:
            if len(resp) >= 3 and resp[0] == b"STATUS" and isinstance(resp[2], list):
                values = dict(zip(resp[2][::2], resp[2][1::2], strict=False))
                value = values.get(b"UIDNEXT")
                if isinstance(value, bytes) and value.isdigit():
                    return int(value)
        return 1

    async def _uids_of(self, name: str, since: int, bases: Sequence[str]
                       ) -> tuple[str | None, dict[str, str]]:
        """The validity and the UIDs Dovecot gave the files `bases` (UID >= `since`). A
        file not numbered (none seen so far) is left unproven here: the copy's check reads
        it back over IMAP, its UID from the listing, before it counts."""
        wanted = set(bases)
        found: dict[str, str] = {}
        self._selected = None  # a new EXAMINE: Dovecot looks at the folder again
        if not await self._select(name):
            return None, {}
        await self._number(since, wanted, found)
        self.unnumbered += len(wanted) - len(found)
        return self.validity or None, found

    async def _number(self, since: int, wanted: set[str], found: dict[str, str]) -> None:
        """Add to `found` the UIDs (by base name) of the `wanted` files Dovecot lists."""

        def collect(resp: Untagged) -> None:
            items = fetch_items(resp)
            if items is None:
                return
            uid, guid = items.get(b"UID"), items.get(b"X-GUID")
            if isinstance(uid, bytes) and isinstance(guid, bytes):
                base = guid.decode().split(",", 1)[0]
                if base in wanted:
                    found[base] = uid.decode()

        def mine(resp: Untagged) -> bool:  # not a read-back's body fetch in flight beside it
            items = fetch_items(resp)
            return items is not None and b"X-GUID" in items

        client = self._c()
        pending = await client.start([f"UID FETCH {since}:* (UID X-GUID)".encode()],
                                     "UID FETCH", handler=collect, accepts=mine)
        await client.finish(pending)

    async def append_stream(self, name: str, flags: tuple[str, ...], date: str | None,
                            size: int, chunks: AsyncIterator[bytes]) -> object:
        """A big message: written into `tmp/` chunk by chunk as the source's FETCH hands
        it on (memory bounded by a chunk), finished by `append_finish`."""
        marks = letters(flags)
        folder = await self._folder_of(name) if marks is not None else None
        if marks is None or folder is None:
            return await super().append_stream(name, flags, date, size, chunks)
        job = _Streaming(name, folder, new_base(), marks, date)
        tmp = folder.path / "tmp" / job.base
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, folder.mode)
        except OSError as exc:  # tmp/ not ours to write (permissions, a read-only mount)
            self._refuse(f"{tmp.parent}: {exc.strerror or exc}")
            return await super().append_stream(name, flags, date, size, chunks)
        try:
            async for chunk in chunks:
                if job.error is None:
                    try:
                        write_all(fd, chunk)
                    except OSError as exc:  # read on: the source's literal must be consumed
                        job.error = f"writing into {folder.path}: {exc.strerror or exc}"
                job.size += len(chunk)
            if job.error is None:
                try:
                    await asyncio.to_thread(_finish_file, fd, folder, date)
                except OSError as exc:
                    job.error = f"writing into {folder.path}: {exc.strerror or exc}"
        except BaseException:  # the source failed mid-message: nothing of it stays
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if job.error is not None:
            os.unlink(tmp)
        return job

    async def append_finish(self, pending: object, *, wire_size: int | None = None
                            ) -> AppendResult:
        """Link a streamed file into `cur/` and learn its UID (or pass an IMAP APPEND's
        answer on)."""
        if not isinstance(pending, _Streaming):
            return await super().append_finish(pending)
        job = pending
        if job.error is not None:
            return AppendResult(None, [None], [job.error])
        since = await self._uidnext(job.name)
        tmp = job.folder.path / "tmp" / job.base
        try:
            path = await asyncio.to_thread(self._link_synced, job, tmp, wire_size)
        except OSError as exc:
            return AppendResult(None, [None], [f"linking into {job.folder.path}: {exc}"])
        validity, given = await self._uids_of(job.name, since, [job.base])
        uid = given.get(job.base)
        if uid is not None:
            self._written[(job.name, uid)] = _Written(job.base, path)
        return AppendResult(validity, [uid], [None])

    @staticmethod
    def _link_synced(job: _Streaming, tmp: Path, wire_size: int | None) -> Path:
        # W= (the size with CRLF line ends) from the pipeline's hash of the message: without
        # it Dovecot reads the whole file to count bare LFs when a client asks its
        # RFC822.SIZE (the copy's own check does: 0.6 CPU-s on the 680 MB benchmark);
        # counting them here again was a tenth of the mover's CPU.
        vsize = f",W={wire_size}" if wire_size is not None else ""
        path = job.folder.path / "cur" / f"{job.base},S={job.size}{vsize}:2,{job.flags}"
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        fsync_path(path.parent)
        return path

    async def read_back(self, name: str, uids: Sequence[str], sink: Sink, *,
                        raw: bool = False) -> None:
        """The files this process wrote, read from disk; any other UID over IMAP."""
        mine = [u for u in uids if (name, u) in self._written]
        others = [u for u in uids if (name, u) not in self._written]
        for uid in mine:
            data = await asyncio.to_thread(_read_file, self._written[(name, uid)], raw)
            if data is not None:
                await sink(uid, data, None, None)
        if others:
            await super().read_back(name, others, sink, raw=raw)


def _locate(written: _Written) -> Path | None:
    """The file's present name: as linked, or as Dovecot renamed it (new flags)."""
    if written.path.exists():
        return written.path
    for entry in os.scandir(written.path.parent):
        if entry.name.startswith((written.base + ",", written.base + ":")):
            return Path(entry.path)
    return None


def _read_file(written: _Written, raw: bool) -> bytes | None:
    """A written file's bytes (a `Digest` over DIGEST_OVER: `raw` hashes them as stored,
    else in wire form), or None when it is gone (that copy is not proven)."""
    path = _locate(written)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= DIGEST_OVER:
                return f.read()
            if raw:
                return Digest.of(hashlib.file_digest(f, "sha256").hexdigest(), size, raw=True)
            wire = WireHash()
            while chunk := f.read(_CHUNK):
                wire.update(chunk)
            return Digest.of(wire.hexdigest(), size)
    except FileNotFoundError:
        return None

