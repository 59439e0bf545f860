"""The account table, for drivers that keep it in their own SQLite file (the Postfix +
Dovecot driver and the generic IMAP driver share the schema of `pfdovecot_tables`). One
implementation, so both drivers behave the same; what a write *means* for the system (the
Postfix maps and Dovecot's passwd file re-rendered, or only mailferry's registry) is the
driver's `_write`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, Protocol, cast

from reconciler.drivers.base import Account
from reconciler.drivers.pfdovecot_tables import Row, Tables, row_of
from reconciler.errors import PermanentError


class _Driver(Protocol):
    """What the mixin needs of its driver (`tables` is an attribute of one driver and a
    property made on first use of the other: a Protocol accepts both)."""

    @property
    def tables(self) -> Tables: ...


class SqliteAccountsMixin:
    """Read and change account rows over the driver's `tables`, `_read` and `_write`."""

    name: str
    _read: Callable[[str, Callable[[sqlite3.Connection], Any]], Any]
    _write: Callable[[str, Callable[[sqlite3.Connection], Any]], Any]

    @property
    def _tables_of_driver(self) -> Tables:
        return cast(_Driver, self).tables

    def _account(self, row: Row) -> Account:
        return Account(mailbox_id=row.mailbox_id,
                       physical_address=self._tables_of_driver.physical(row.mailbox_id),
                       access_addresses=row.access_addresses, aliases=row.aliases,
                       internal_address=row.internal_address, redirect_to=row.redirect_to,
                       syncfed=row.syncfed)

    def list_accounts(self) -> list[Account]:
        """Every mailbox with its physical address."""
        return [self._account(r) for r in self._read("list accounts", self._tables_of_driver.rows)]

    def get_account(self, mailbox_id: str) -> Account | None:
        """One account or None."""
        def query(conn: sqlite3.Connection) -> Row | None:
            r = conn.execute("SELECT * FROM accounts WHERE mailbox_id = ?",
                             (mailbox_id,)).fetchone()
            return None if r is None else row_of(r)
        row: Row | None = self._read(f"get {mailbox_id}", query)
        return None if row is None else self._account(row)

    def _insert_account(self, what: str, mailbox_id: str, internal_address: str | None,
                        access_addresses: tuple[str, ...], redirect_to: str | None) -> None:
        """Add the row unless it exists (an existing account is left as it is)."""
        self._write(what, lambda conn: conn.execute(
            "INSERT OR IGNORE INTO accounts (mailbox_id, access_addresses, "
            "internal_address, redirect_to) VALUES (?, ?, ?, ?)",
            (mailbox_id, json.dumps(list(access_addresses)), internal_address, redirect_to)))

    def _update(self, mailbox_id: str, what: str, sql: str, args: tuple[object, ...]) -> None:
        def change(conn: sqlite3.Connection) -> None:
            if conn.execute(sql + " WHERE mailbox_id = ?", (*args, mailbox_id)).rowcount == 0:
                raise PermanentError(f"{self.name}: no mailbox {mailbox_id} ({what})")
        self._write(f"{what} of {mailbox_id}", change)

    def set_addresses(
        self, mailbox_id: str, access_addresses: tuple[str, ...], aliases: tuple[str, ...]
    ) -> None:
        """Replace the access addresses and aliases (what up-sync tells fed; the Postfix
        driver's alias map follows)."""
        self._update(mailbox_id, "set addresses",
                     "UPDATE accounts SET access_addresses = ?, aliases = ?",
                     (json.dumps(list(access_addresses)), json.dumps(list(aliases))))

    def set_redirect(self, mailbox_id: str, target: str | None) -> None:
        """Record the redirect (the Postfix driver: physical address -> target in the alias
        map, None: deliver to Dovecot again; the IMAP driver cannot tell its server)."""
        self._update(mailbox_id, "set redirect", "UPDATE accounts SET redirect_to = ?",
                     (target,))

    def set_syncfed(self, mailbox_id: str, value: bool) -> None:
        """Set or clear the syncfed marker."""
        self._update(mailbox_id, "set syncfed", "UPDATE accounts SET syncfed = ?", (int(value),))
