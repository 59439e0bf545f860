"""On-disk format of the embedded maildir system: account table and Maildir++ folders.

Why a module of its own: two programs share this format. The server (`maildir_system.server`)
reads the account table at every delivery and writes messages into Maildirs; the reconciler's
driver (`reconciler.drivers.maildir`) is the *admin tool* of the same system, the way doveadm
is for Dovecot, and edits the same tables and folders directly. Keeping one implementation
of the format means the two can never disagree about where a folder lives or how an address
resolves. This module therefore imports nothing from `reconciler/`.

Layout under the system root::

    accounts.db                     SQLite (WAL): accounts, contacts, address_book, deliveries
    mailboxes/<mailbox_id>/         Maildir++ : cur/ new/ tmp/ = INBOX
    mailboxes/<mailbox_id>/.Sent/   a subfolder; "Archive/2023" is ".Archive.2023/"
    mailboxes/<mailbox_id>/calendar.ics   diary data

Durability: a message is written to tmp/, fsynced, renamed into new/ (or cur/ with flags)
and the directory is fsynced, so a message this module returned a key for survives a power
cut (the server answers 250 only after that). Bytes are stored exactly as given, INTERNALDATE
is the file's mtime. Folder names, flags, durable file writes and streaming hashes are in
`maildir_system.mailfile`; this module adds the tables and the mailbox-level operations.

SQLite is opened per operation with a busy timeout: the server and any number of admin
processes may use the same database at once, and WAL lets readers proceed during writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from maildir_system.mailfile import (
    INBOX,
    BadFolderName,
    atomic_write,
    counter,
    folder_dirname,
    folder_from_dirname,
    fsync_dir,
    hash_file,
    normalize_flags,
)
from mailferry.mail.addresses import address_key, split_physical

# Names other modules (the server, the driver, tests) take from here: one import for the format.
__all__ = [
    "INBOX", "AccountRow", "Delivery", "MessageFile", "Store", "StoreError", "folder_dirname",
    "folder_from_dirname", "hash_file", "normalize_flags",
]

DIARY_FILE = "calendar.ics"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    mailbox_id TEXT PRIMARY KEY,
    access_addresses TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]',
    internal_address TEXT,
    redirect_to TEXT,
    syncfed INTEGER NOT NULL DEFAULT 0,
    via_fed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS contacts (
    address TEXT PRIMARY KEY,
    addresses TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS address_book (
    address TEXT PRIMARY KEY,
    physical TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    mailbox_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    message_id TEXT,
    sha256 TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('stored', 'redirected')),
    detail TEXT
);
"""


@dataclass(frozen=True)
class AccountRow:
    """One row of the account table, as stored."""

    mailbox_id: str
    access_addresses: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    internal_address: str | None = None
    redirect_to: str | None = None
    syncfed: bool = False
    via_fed: bool = False  # local users' mail to its addresses goes through fed (E4-E9)

    def addresses(self) -> tuple[str, ...]:
        """Every address (as its key: lower-case, IDN domains in A-labels) that resolves to
        this account, physical excepted."""
        extra = (self.internal_address,) if self.internal_address else ()
        return tuple(address_key(a) for a in self.access_addresses + self.aliases + extra)


@dataclass(frozen=True)
class MessageFile:
    """A message file as listed: no body, its hash and Message-ID computed by streaming."""

    folder: str
    key: str
    flags: str
    mtime: float
    size: int
    sha256: str
    message_id: str | None
    path: Path = field(compare=False)


@dataclass(frozen=True)
class Delivery:
    """One row of the delivery journal."""

    id: int
    at: float
    mailbox_id: str
    rcpt: str
    message_id: str | None
    sha256: str
    action: str
    detail: str | None


class StoreError(Exception):
    """The store cannot do what was asked (unknown mailbox, bad folder name, bad key)."""


# -- the store --------------------------------------------------------------------------------
class Store:
    """The account table and the Maildirs of one maildir system root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.mailboxes = self.root / "mailboxes"
        self.db_path = self.root / "accounts.db"
        self.mailboxes.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            # WAL is a property of the database file: set once, it stays for every process.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(accounts)")}
            if "via_fed" not in columns:  # a root made before the column existed
                conn.execute("ALTER TABLE accounts ADD COLUMN via_fed INTEGER NOT NULL DEFAULT 0")
        finally:
            conn.close()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction (committed on success, rolled back on error)."""
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    # -- accounts ---------------------------------------------------------------------------
    @staticmethod
    def _row(r: tuple[object, ...]) -> AccountRow:
        return AccountRow(
            mailbox_id=str(r[0]),
            access_addresses=tuple(json.loads(str(r[1]))),
            aliases=tuple(json.loads(str(r[2]))),
            internal_address=None if r[3] is None else str(r[3]),
            redirect_to=None if r[4] is None else str(r[4]),
            syncfed=bool(r[5]),
            via_fed=bool(r[6]),
        )

    _COLS = ("mailbox_id, access_addresses, aliases, internal_address, redirect_to, syncfed,"
             " via_fed")

    def accounts(self) -> list[AccountRow]:
        """Every account, sorted by mailbox id."""
        with self._db() as db:
            rows = db.execute(f"SELECT {self._COLS} FROM accounts ORDER BY mailbox_id").fetchall()
        return [self._row(r) for r in rows]

    def account(self, mailbox_id: str) -> AccountRow | None:
        """The account of `mailbox_id`, or None."""
        with self._db() as db:
            r = db.execute(
                f"SELECT {self._COLS} FROM accounts WHERE mailbox_id = ?", (mailbox_id,)
            ).fetchone()
        return None if r is None else self._row(r)

    def create_account(
        self, mailbox_id: str, *, internal_address: str | None = None,
        access_addresses: tuple[str, ...] = (), redirect_to: str | None = None,
    ) -> AccountRow:
        """Create the Maildir and the account unless it exists; return the account as stored."""
        self._check_id(mailbox_id)
        # Maildir first: an account row must never point at a missing Maildir.
        self._ensure_maildir(self.mailbox_dir(mailbox_id))
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO accounts (mailbox_id, access_addresses, aliases,"
                " internal_address, redirect_to, syncfed) VALUES (?, ?, '[]', ?, ?, 0)",
                (mailbox_id, json.dumps(list(access_addresses)), internal_address, redirect_to),
            )
        row = self.account(mailbox_id)
        assert row is not None
        return row

    def _update(self, mailbox_id: str, sql: str, args: tuple[object, ...]) -> None:
        with self._db() as db:
            cur = db.execute(f"UPDATE accounts SET {sql} WHERE mailbox_id = ?", (*args, mailbox_id))
            if cur.rowcount == 0:
                raise StoreError(f"no mailbox {mailbox_id!r}")

    def set_addresses(
        self, mailbox_id: str, access_addresses: tuple[str, ...], aliases: tuple[str, ...]
    ) -> None:
        """Replace the access addresses and aliases of an account."""
        self._update(mailbox_id, "access_addresses = ?, aliases = ?",
                     (json.dumps(list(access_addresses)), json.dumps(list(aliases))))

    def set_redirect(self, mailbox_id: str, target: str | None) -> None:
        """Set or clear the redirect of an account."""
        self._update(mailbox_id, "redirect_to = ?", (target,))

    def set_redirects(self, redirects: dict[str, str | None]) -> None:
        """`set_redirect` for several accounts in one transaction; a mailbox that does not
        exist (any more) is skipped."""
        with self._db() as db:
            db.executemany("UPDATE accounts SET redirect_to = ? WHERE mailbox_id = ?",
                           [(target, mailbox_id) for mailbox_id, target in redirects.items()])

    def set_syncfed(self, mailbox_id: str, value: bool) -> None:
        """Set or clear the syncfed marker."""
        self._update(mailbox_id, "syncfed = ?", (int(value),))

    def set_via_fed(self, mailbox_id: str, value: bool) -> None:
        """Send local users' mail for the account's addresses through fed (or not)."""
        self._update(mailbox_id, "via_fed = ?", (int(value),))

    def set_via_fed_many(self, mailbox_ids: list[str], value: bool) -> None:
        """`set_via_fed` for several accounts in one transaction (all or none)."""
        with self._db() as db:
            for mailbox_id in mailbox_ids:
                cur = db.execute("UPDATE accounts SET via_fed = ? WHERE mailbox_id = ?",
                                 (int(value), mailbox_id))
                if cur.rowcount == 0:
                    raise StoreError(f"no mailbox {mailbox_id!r}")

    def delete_account(self, mailbox_id: str) -> None:
        """Remove the account first (no more deliveries), then its Maildir."""
        self._check_id(mailbox_id)
        with self._db() as db:
            db.execute("DELETE FROM accounts WHERE mailbox_id = ?", (mailbox_id,))
        shutil.rmtree(self.mailbox_dir(mailbox_id), ignore_errors=True)

    def resolve(self, address: str, system_name: str) -> AccountRow | None:
        """The account an address reaches: physical address, access address, alias, internal."""
        addr = address_key(address)  # either IDN form of a domain, any case
        accounts = self.accounts()
        physical = split_physical(addr)
        if physical is not None and physical[0] == system_name.lower():
            return next((a for a in accounts if a.mailbox_id.lower() == physical[1]), None)
        return next((a for a in accounts if addr in a.addresses()), None)

    # -- contacts and address book -----------------------------------------------------------
    def put_contact(self, address: str, addresses: tuple[str, ...]) -> None:
        """Insert or replace a contact."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO contacts (address, addresses) VALUES (?, ?)",
                       (address, json.dumps(list(addresses))))

    def contacts(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every contact as (address, addresses)."""
        with self._db() as db:
            rows = db.execute("SELECT address, addresses FROM contacts ORDER BY address").fetchall()
        return [(str(a), tuple(json.loads(str(b)))) for a, b in rows]

    def delete_contact(self, address: str) -> None:
        """Remove a contact (missing: no-op)."""
        with self._db() as db:
            db.execute("DELETE FROM contacts WHERE address = ?", (address,))

    def replace_address_book(self, entries: dict[str, str]) -> None:
        """Replace the whole address book in one transaction."""
        with self._db() as db:
            db.execute("DELETE FROM address_book")
            db.executemany("INSERT INTO address_book (address, physical) VALUES (?, ?)",
                           sorted(entries.items()))

    def address_book(self) -> dict[str, str]:
        """The address book, address -> physical address."""
        with self._db() as db:
            rows = db.execute("SELECT address, physical FROM address_book").fetchall()
        return {str(a): str(p) for a, p in rows}

    # -- delivery journal -----------------------------------------------------------------------
    def record_delivery(
        self, mailbox_id: str, rcpt: str, message_id: str | None, sha256: str, action: str,
        detail: str | None = None,
    ) -> None:
        """Append one row to the delivery journal."""
        with self._db() as db:
            db.execute(
                "INSERT INTO deliveries (at, mailbox_id, rcpt, message_id, sha256, action, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), mailbox_id, rcpt, message_id, sha256, action, detail),
            )

    def deliveries(self, mailbox_id: str | None = None, since: float = 0.0) -> list[Delivery]:
        """Journal rows, oldest first, optionally for one mailbox and after a time."""
        sql = ("SELECT id, at, mailbox_id, rcpt, message_id, sha256, action, detail"
               " FROM deliveries WHERE at >= ?")
        args: list[object] = [since]
        if mailbox_id is not None:
            sql += " AND mailbox_id = ?"
            args.append(mailbox_id)
        with self._db() as db:
            rows = db.execute(sql + " ORDER BY id", args).fetchall()
        return [Delivery(*r) for r in rows]

    # -- Maildirs --------------------------------------------------------------------------------
    @staticmethod
    def _check_id(mailbox_id: str) -> None:
        # The id becomes a directory name: refuse anything that could escape the root.
        if not mailbox_id or "/" in mailbox_id or mailbox_id in (".", "..") or "\0" in mailbox_id:
            raise StoreError(f"bad mailbox id {mailbox_id!r}")

    def mailbox_dir(self, mailbox_id: str) -> Path:
        """The Maildir of a mailbox (may not exist)."""
        self._check_id(mailbox_id)
        return self.mailboxes / mailbox_id

    def exists(self, mailbox_id: str) -> bool:
        """True when the mailbox's Maildir exists."""
        return (self.mailbox_dir(mailbox_id) / "cur").is_dir()

    @staticmethod
    def _ensure_maildir(path: Path) -> None:
        created = False
        for sub in ("cur", "new", "tmp"):
            if not (path / sub).is_dir():
                (path / sub).mkdir(parents=True, exist_ok=True)
                created = True
        if created:
            fsync_dir(path)
            fsync_dir(path.parent)

    def folder_dir(self, mailbox_id: str, folder: str, *, create: bool = False) -> Path:
        """Directory of a folder; with create=True the folder is made if missing."""
        base = self.mailbox_dir(mailbox_id)
        if not (base / "cur").is_dir():
            raise StoreError(f"no mailbox {mailbox_id!r}")
        try:
            name = folder_dirname(folder)
        except BadFolderName as exc:
            raise StoreError(str(exc)) from exc
        path = base / name if name else base
        if create:
            self._ensure_maildir(path)
            marker = path / "maildirfolder"
            if path != base and not marker.exists():
                # Maildir++ marks subfolders with this (empty) file; Dovecot and Courier use it.
                marker.touch()
        elif not (path / "cur").is_dir():
            raise StoreError(f"no folder {folder!r} in mailbox {mailbox_id!r}")
        return path

    def folders(self, mailbox_id: str) -> list[str]:
        """INBOX first, then every subfolder name, sorted."""
        base = self.mailbox_dir(mailbox_id)
        if not (base / "cur").is_dir():
            raise StoreError(f"no mailbox {mailbox_id!r}")
        subs = sorted(
            folder_from_dirname(e.name) for e in os.scandir(base)
            if e.is_dir() and e.name.startswith(".") and e.name not in (".", "..")
            and os.path.isdir(os.path.join(e.path, "cur"))
        )
        return [INBOX, *subs]

    def _files(self, folder_path: Path) -> Iterator[tuple[Path, str, str]]:
        """(path, key, flags) of every message file in new/ and cur/."""
        for sub in ("new", "cur"):
            with os.scandir(folder_path / sub) as it:
                for entry in it:
                    if entry.name.startswith(".") or not entry.is_file():
                        continue
                    key, _, info = entry.name.partition(":")
                    flags = info[2:] if info.startswith("2,") else ""
                    yield Path(entry.path), key, normalize_flags(flags)

    def messages(self, mailbox_id: str, folder: str) -> list[MessageFile]:
        """Every message of a folder with hash and Message-ID, sorted by date then key."""
        out: list[MessageFile] = []
        for path, key, flags in self._files(self.folder_dir(mailbox_id, folder)):
            try:
                mtime = path.stat().st_mtime
                sha, size, msgid = hash_file(path)
            except FileNotFoundError:
                continue  # expunged or moved new/ -> cur/ by a client while we listed
            out.append(MessageFile(folder, key, flags, mtime, size, sha, msgid, path))
        out.sort(key=lambda m: (m.mtime, m.key))
        return out

    def message_path(self, mailbox_id: str, folder: str, key: str) -> Path:
        """The file of message `key` (looked up in new/ and cur/)."""
        if "/" in key or not key or key.startswith("."):
            raise StoreError(f"bad message key {key!r}")
        for path, k, _ in self._files(self.folder_dir(mailbox_id, folder)):
            if k == key:
                return path
        raise StoreError(f"no message {key!r} in {mailbox_id!r}/{folder}")

    def read(self, mailbox_id: str, folder: str, key: str) -> bytes:
        """The exact bytes of a message."""
        return self.message_path(mailbox_id, folder, key).read_bytes()

    def append(
        self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
        internal_date: float | None = None,
    ) -> str:
        """Store `data` durably and byte-for-byte; return the new message's key."""
        path = self.folder_dir(mailbox_id, folder, create=True)
        now = time.time()
        key = (f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{next(counter)}"
               f"R{os.urandom(4).hex()}.{socket.gethostname().replace('/', '_').replace(':', '_')}"
               f",S={len(data)}")
        tmp = path / "tmp" / key
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        stamp = now if internal_date is None else internal_date
        os.utime(tmp, (stamp, stamp))
        flags = normalize_flags(flags)
        final = path / "cur" / f"{key}:2,{flags}" if flags else path / "new" / key
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return key

    def mailbox_size(self, mailbox_id: str) -> tuple[int, int]:
        """(bytes, messages) over every folder, from stat only."""
        total = count = 0
        for folder in self.folders(mailbox_id):
            for path, _, _ in self._files(self.folder_dir(mailbox_id, folder)):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
                    count += 1
        return total, count

    # -- diary --------------------------------------------------------------------------------
    def read_diary(self, mailbox_id: str) -> bytes | None:
        """The mailbox's calendar.ics, or None."""
        path = self.mailbox_dir(mailbox_id) / DIARY_FILE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def write_diary(self, mailbox_id: str, data: bytes) -> None:
        """Replace the mailbox's calendar.ics atomically."""
        if not self.exists(mailbox_id):
            raise StoreError(f"no mailbox {mailbox_id!r}")
        atomic_write(self.mailbox_dir(mailbox_id) / DIARY_FILE, data)
