"""The tables a Postfix + Dovecot system reads, and the small database they are made from.

Why a database *and* tables: Postfix and Dovecot each want their own flat file (a Postfix
`hash:` map, a Dovecot passwd-file), and neither can hold what mailferry must also remember
about a mailbox (which of its addresses are access addresses and which aliases, its internal
address, its syncfed marker, the contacts table, the address book, the diary). So
`mailferry.db` (SQLite, in the system's state folder, next to the tables) is the account
table, and every change regenerates the files from it:

- ``passwd``: Dovecot passdb + userdb (passwd-file), one line per mailbox:
  ``<mailbox id>:<password>:<uid>:<gid>::<mail root>/<mailbox id>::``. A password an admin
  set is kept across rewrites; new mailboxes get ``!`` (no password login; the master user
  still reads them).
- ``virtual_mailbox``: Postfix `virtual_mailbox_maps`: ``<physical address>  <id>/``: the
  physical addresses (`<id>@<system>.invalid`) this system delivers to Dovecot over LMTP.
- ``virtual_alias``: Postfix `virtual_alias_maps`, applied by cleanup to *every* recipient
  whatever its domain: each access address, alias and internal address -> the mailbox's
  physical address (an IDN domain in both its forms: `postfix_keys`); and for a redirected
  mailbox, physical address -> redirect target.
  Postfix expands aliases recursively, so ``AD1 -> ADP1 -> ADP2`` sends both outside mail
  and the system's own local users' mail for AD1 to the new mailbox, through fed. A mailbox
  marked ``via_fed`` (during its cutover) gets no line for its access addresses and aliases:
  Postfix then relays local users' mail for them to fed, like any shared-domain address.

New users are written to the passwd-file first and the Postfix maps only once `doveadm user`
resolves them (Dovecot re-reads the file at most once a second): otherwise Postfix could hand
Dovecot mail for a user it does not know yet, which bounces. Removed users leave the maps
first and the passwd-file last, for the same reason.

Where things live: ``mailferry.db`` and its ``.lock`` are always in the state folder on the
reconciler's machine; the rendered files are written through a `Host` (`hosts.py`) into the
*tables folder* on the mail host (the state folder itself when the system is local).

Crash safety, in this order, all under an exclusive `fcntl` lock on ``.lock`` and inside one
SQLite ``BEGIN IMMEDIATE`` transaction: change the rows, render the files from the changed
rows, replace every file that differs (`Host.replace_file`: write a temporary file, fsync,
`postmap` it under the temporary name, rename the ``.db`` then the source into place), and
only then commit. A
crash leaves the files ahead of the database, never behind: the step that was interrupted
finds the database unchanged, does its change again and rewrites the same files. Each
driver also re-renders once at first use, which repairs any leftover difference.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailferry.mail.addresses import domain_to_unicode
from reconciler.drivers.hosts import Host, HostError, LocalHost

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    mailbox_id TEXT PRIMARY KEY,
    access_addresses TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]',
    internal_address TEXT,
    redirect_to TEXT,
    syncfed INTEGER NOT NULL DEFAULT 0,
    via_fed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS contacts (address TEXT PRIMARY KEY, addresses TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS address_book (address TEXT PRIMARY KEY, physical TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS diary (mailbox_id TEXT PRIMARY KEY, data BLOB NOT NULL);
"""


LOCKED = "{CRYPT}!"  # crypt() never yields "!": no password logs in


class TableError(Exception):
    """A table could not be written or compiled (OS error, postmap failure)."""


@dataclass(frozen=True)
class Row:
    """One row of the account table."""

    mailbox_id: str
    access_addresses: tuple[str, ...]
    aliases: tuple[str, ...]
    internal_address: str | None
    redirect_to: str | None
    syncfed: bool
    via_fed: bool = False  # access addresses and aliases left to relayhost = fed (E4-E9)


def postfix_keys(address: str, unicode_keys: bool) -> list[str]:
    """The lookup keys Postfix gets for one address (the key, its domain in A-labels).

    Postfix converts no IDN between its forms (SMTPUTF8_README: "configure both the ASCII
    and UTF-8 forms ... as lookup table search keys"); with `unicode_keys` a domain with
    A-labels gets a second line in U-labels. Only when the system's LMTP offers SMTPUTF8:
    mail written to the U-label form is SMTPUTF8 mail, and Postfix bounces it (5.6.7) at
    an LMTP server without SMTPUTF8 (Dovecot 2.3) even after the alias made the recipient
    ASCII. Without the U-label line Postfix relays such mail to fed (relayhost, the shared-
    domain rule), whose directory knows both forms and delivers it back to the ASCII
    physical address without SMTPUTF8. Case is Postfix's: it casefolds keys and queries
    alike (postmap too) when smtputf8_enable = yes."""
    local, _, domain = address.rpartition("@")
    if not unicode_keys:
        return [address]
    unicode = domain_to_unicode(domain)
    return [address] if unicode == domain else [address, f"{local}@{unicode}"]


def row_of(r: sqlite3.Row) -> Row:
    return Row(r["mailbox_id"], tuple(json.loads(r["access_addresses"])),
               tuple(json.loads(r["aliases"])), r["internal_address"], r["redirect_to"],
               bool(r["syncfed"]), bool(r["via_fed"]))


class Tables:
    """The account database of one system and the Postfix/Dovecot files rendered from it."""

    header = "# generated by mailferry from mailferry.db: edits are overwritten\n"

    def __init__(self, state_dir: Path, system: str, postfix_dir: str, mail_root: str,
                 uid: int, gid: int, *, files: bool = True,
                 dovecot_config: str | None = None, host: Host | None = None,
                 tables_dir: str | None = None) -> None:
        self.dir = state_dir  # mailferry.db and .lock: always on the reconciler's machine
        self.host: Host = host or LocalHost()
        self.tables_dir = tables_dir or str(state_dir)  # the rendered files, on the host
        self.system = system
        self.postfix_dir = postfix_dir
        self.mail_root = mail_root
        self.uid, self.gid = uid, gid
        self.dovecot_config = dovecot_config  # doveadm -c: to wait until Dovecot sees users
        self.files = files  # False: only the database (a system mailferry cannot administer)
        self.db_path = state_dir / "mailferry.db"
        self._repaired = False
        # During `install`: the tables as read once from the host (name -> text) and which
        # compiled maps exist, so that a write costs one read round trip, not one per look.
        self._snapshot: dict[str, str | None] | None = None
        self._compiled: set[str] = set()
        # Postfix gets the U-label form of IDN keys too (`postfix_keys`): set by the driver
        # once it saw the LMTP server offer SMTPUTF8.
        self.unicode_keys = False

    def physical(self, mailbox_id: str) -> str:
        return f"{mailbox_id}@{self.system}.invalid"

    def home(self, mailbox_id: str) -> Path:
        return Path(self.mail_root) / mailbox_id

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read-only view (SQLite gives readers a consistent snapshot)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.executescript(SCHEMA)
            columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(accounts)")}
            if "via_fed" not in columns:  # a database made before the column existed
                conn.execute("ALTER TABLE accounts ADD COLUMN via_fed INTEGER NOT NULL DEFAULT 0")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """Lock, change rows, render + install the files, commit (see the module docstring)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with self.read() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    self.install(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise

    def repair(self) -> None:
        """Once per driver: make the files match the database (after a crash, or first use)."""
        if self._repaired:
            return
        with self.write():
            pass
        self._repaired = True

    # -- rendering ---------------------------------------------------------------------------
    def rows(self, conn: sqlite3.Connection) -> list[Row]:
        return [row_of(r) for r in conn.execute("SELECT * FROM accounts ORDER BY mailbox_id")]

    def render(self, conn: sqlite3.Connection) -> dict[str, str]:
        """file name -> content, from the rows visible in `conn`."""
        passwords = self._current_passwords()
        passwd: list[str] = []
        mailbox: list[str] = []
        alias: list[str] = []
        for row in self.rows(conn):
            adp = self.physical(row.mailbox_id)
            password = passwords.get(row.mailbox_id, LOCKED)
            passwd.append(f"{row.mailbox_id}:{password}:{self.uid}:{self.gid}::"
                          f"{self.home(row.mailbox_id)}::")
            mailbox.append(f"{adp}\t{row.mailbox_id}/")
            # via_fed: no alias line, so Postfix hands local users' mail for these addresses
            # to relayhost = fed, whose hold and directory decide (the shared-domain rule).
            local = [] if row.via_fed else [*row.access_addresses, *row.aliases]
            if row.internal_address:
                local.append(row.internal_address)
            alias.extend(f"{key}\t{adp}" for address in local
                         for key in postfix_keys(address, self.unicode_keys))
            if row.redirect_to:
                alias.append(f"{adp}\t{row.redirect_to}")
        header = self.header
        return {"passwd": "\n".join(passwd) + ("\n" if passwd else ""),
                "virtual_mailbox": header + "".join(f"{line}\n" for line in mailbox),
                "virtual_alias": header + "".join(f"{line}\n" for line in alias)}

    def table_path(self, name: str) -> str:
        """Where a rendered file lives on the host."""
        return f"{self.tables_dir.rstrip('/')}/{name}"

    def _read_table(self, name: str) -> str | None:
        if self._snapshot is not None and name in self._snapshot:
            return self._snapshot[name]
        try:
            data = self.host.read_file(self.table_path(name))
        except HostError as exc:
            raise TableError(str(exc)) from exc
        return None if data is None else data.decode("utf-8")

    def _current_passwords(self) -> dict[str, str]:
        """Password fields of the current passwd-file (an admin may have set some)."""
        found: dict[str, str] = {}
        for line in (self._read_table("passwd") or "").splitlines():
            parts = line.split(":")
            if len(parts) >= 2 and parts[0]:
                found[parts[0]] = parts[1]
        return found

    def install(self, conn: sqlite3.Connection) -> None:
        """Replace every rendered file whose content differs (maps compiled by postmap)."""
        if not self.files:
            return
        names = ("passwd", "virtual_mailbox", "virtual_alias")
        try:
            raw, dbs = self.host.snapshot([self.table_path(n) for n in names],
                                          [f"{self.table_path(n)}.db" for n in names[1:]])
        except HostError as exc:
            raise TableError(str(exc)) from exc
        self._snapshot = {n: None if raw[self.table_path(n)] is None
                          else (raw[self.table_path(n)] or b"").decode("utf-8") for n in names}
        self._compiled = {n for n in names if f"{self.table_path(n)}.db" in dbs}
        try:
            self._install(conn)
        finally:
            self._snapshot = None

    def _install(self, conn: sqlite3.Connection) -> None:
        files = self.render(conn)
        old = self._current_passwords()
        new_lines = {line.split(":", 1)[0]: line for line in files["passwd"].splitlines()}
        added = sorted(set(new_lines) - set(old))
        if added:  # Dovecot first, and only once it sees them: Postfix may deliver at once
            union = self._current_lines() | new_lines
            self._replace("passwd", "".join(f"{union[k]}\n" for k in sorted(union)),
                          postmap=False)
            self._wait_visible(added)
        self._replace("virtual_mailbox", files["virtual_mailbox"], postmap=True)
        self._replace("virtual_alias", files["virtual_alias"], postmap=True)
        self._replace("passwd", files["passwd"], postmap=False)  # removals last

    def _current_lines(self) -> dict[str, str]:
        return {line.split(":", 1)[0]: line
                for line in (self._read_table("passwd") or "").splitlines() if line}

    def _wait_visible(self, users: list[str], timeout: float = 5.0) -> None:
        """Until Dovecot's auth resolves every new user (it re-reads passwd-file at most once
        a second), so that no LMTP delivery meets "User doesn't exist" and bounces."""
        if not self.dovecot_config:
            return
        deadline = time.monotonic() + timeout
        for user in users:
            while True:
                try:
                    self.host.run(["doveadm", "-c", self.dovecot_config, "user", user],
                                  timeout=30)
                    break
                except HostError as exc:
                    if time.monotonic() > deadline:
                        raise TableError(f"Dovecot does not see the new user {user}: "
                                         f"{exc}") from exc
                time.sleep(0.1)

    def _replace(self, name: str, text: str, *, postmap: bool) -> None:
        path = self.table_path(name)
        try:
            current = self._read_table(name)
            compiled = name in self._compiled if self._snapshot is not None \
                else self.host.exists(f"{path}.db")
            if current == text and (not postmap or compiled):
                return
            self.host.replace_file(path, text.encode("utf-8"), mode=0o644,
                                   postmap_config=self.postfix_dir if postmap else None)
            if self._snapshot is not None:
                self._snapshot[name] = text
                self._compiled.add(name)
        except HostError as exc:
            raise TableError(str(exc)) from exc
