"""The contacts table TC and the down-synced address book, for drivers that keep them in
their own SQLite file (the Postfix + Dovecot driver and the generic IMAP driver share the
schema of `pfdovecot_tables`). One implementation, so both drivers behave the same."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from reconciler.drivers.base import Contact


class SqliteContactsMixin:
    """put/list/delete contacts and the address book over the driver's `_read`/`_write`."""

    _read: Callable[[str, Callable[[sqlite3.Connection], Any]], Any]
    _write: Callable[[str, Callable[[sqlite3.Connection], Any]], Any]

    def put_contact(self, contact: Contact) -> None:
        """Insert or replace a contact in TC."""
        self._write(f"put contact {contact.address}", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO contacts (address, addresses) VALUES (?, ?)",
            (contact.address, json.dumps(list(contact.addresses)))))

    def list_contacts(self) -> list[Contact]:
        """The contacts table TC."""
        rows = self._read("list contacts", lambda conn: conn.execute(
            "SELECT address, addresses FROM contacts ORDER BY address").fetchall())
        return [Contact(r["address"], tuple(json.loads(r["addresses"]))) for r in rows]

    def delete_contact(self, address: str) -> None:
        """Remove a contact; missing is a no-op."""
        self._write(f"delete contact {address}", lambda conn: conn.execute(
            "DELETE FROM contacts WHERE address = ?", (address,)))

    def apply_address_book(self, entries: dict[str, str]) -> None:
        """Down-sync: replace the address book."""
        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM address_book")
            conn.executemany("INSERT INTO address_book (address, physical) VALUES (?, ?)",
                             sorted(entries.items()))
        self._write("apply address book", change)

    def address_book(self) -> dict[str, str]:
        """The address book as last down-synced."""
        rows = self._read("read address book", lambda conn: conn.execute(
            "SELECT address, physical FROM address_book").fetchall())
        return {r["address"]: r["physical"] for r in rows}
