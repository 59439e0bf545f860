"""Driver of the embedded maildir system: its admin tool, like doveadm for Dovecot.

Why it works on the disk rather than over a protocol: the maildir system keeps its account
table and mailboxes under one root directory (`maildir_system.store`), and reads the table
at every delivery. Editing that table is therefore immediate and transactional (SQLite), and
reading Maildir files gives exact bytes, flags and INTERNALDATE without an IMAP round trip.
The only network use is `ping`, which proves the *server* answers (an LMTP LHLO), because a
root directory on disk says nothing about whether fed can deliver.

Errors: a store problem about a missing mailbox or folder is a PermanentError (the step
asked for something that is not there); an OS error (disk, permissions) is a TemporaryError
so the engine retries. Every mutation is idempotent, as the interface requires.
"""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from maildir_system.store import AccountRow, Store, StoreError
from reconciler.drivers.base import (
    Account,
    Contact,
    DeliveryEndpoint,
    MailboxInfo,
    MailSystemDriver,
    StoredMessage,
    physical_address,
)
from reconciler.errors import PermanentError, TemporaryError

T = TypeVar("T")


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Translate store and OS errors into the reconciler's error kinds."""
    try:
        yield
    except StoreError as exc:
        raise PermanentError(f"{what}: {exc}") from exc
    except OSError as exc:
        raise TemporaryError(f"{what}: {exc}") from exc


class MaildirDriver(MailSystemDriver):
    """Administer one embedded maildir system through its root directory."""

    def __init__(
        self, name: str, root: str | Path, lmtp: tuple[str, int], submission: tuple[str, int],
        internal_domain: str,
    ) -> None:
        self.name = name
        self.root = Path(root)
        self.lmtp = lmtp
        self.submission = submission
        self.internal_domain = internal_domain
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        """The system's store, opened on first use (the root may not exist at construction)."""
        if self._store is None:
            with _errors(f"{self.name}: open {self.root}"):
                self._store = Store(self.root)
        return self._store

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        with _errors(f"{self.name}: {what}"):
            return fn()

    def _account(self, row: AccountRow) -> Account:
        return Account(
            mailbox_id=row.mailbox_id,
            physical_address=physical_address(self.name, row.mailbox_id),
            access_addresses=row.access_addresses,
            aliases=row.aliases,
            internal_address=row.internal_address,
            redirect_to=row.redirect_to,
            syncfed=row.syncfed,
        )

    # -- health -------------------------------------------------------------------------
    def ping(self) -> None:
        """LHLO on the LMTP port; TemporaryError naming host:port and the reason otherwise."""
        host, port = self.lmtp
        try:
            with smtplib.LMTP(host, port, timeout=5.0) as lmtp:
                code, msg = lmtp.ehlo()  # smtplib.LMTP sends LHLO here
                if code != 250:
                    raise TemporaryError(
                        f"{self.name}: LMTP {host}:{port} answered LHLO with {code} {msg!r}"
                    )
        except (OSError, smtplib.SMTPException) as exc:
            raise TemporaryError(f"{self.name}: LMTP {host}:{port} unreachable: {exc}") from exc

    def delivery_endpoint(self) -> DeliveryEndpoint:
        """fed delivers over LMTP to the system's LMTP listener."""
        return DeliveryEndpoint(self.lmtp[0], self.lmtp[1], "lmtp")

    # -- accounts -----------------------------------------------------------------------
    def list_accounts(self) -> list[Account]:
        """Every account with its physical address."""
        return [self._account(r) for r in self._call("list accounts", self.store.accounts)]

    def get_account(self, mailbox_id: str) -> Account | None:
        """One account or None."""
        row = self._call(f"get {mailbox_id}", lambda: self.store.account(mailbox_id))
        return None if row is None else self._account(row)

    def create_mailbox(
        self, mailbox_id: str, *, internal_address: str | None = None,
        access_addresses: tuple[str, ...] = (), redirect_to: str | None = None,
    ) -> Account:
        """Create Maildir and account unless present; an existing account is left as is."""
        row = self._call(f"create {mailbox_id}", lambda: self.store.create_account(
            mailbox_id, internal_address=internal_address, access_addresses=access_addresses,
            redirect_to=redirect_to,
        ))
        return self._account(row)

    def set_addresses(
        self, mailbox_id: str, access_addresses: tuple[str, ...], aliases: tuple[str, ...]
    ) -> None:
        """Replace the access addresses and aliases."""
        self._call(f"set addresses of {mailbox_id}",
                   lambda: self.store.set_addresses(mailbox_id, access_addresses, aliases))

    def set_redirect(self, mailbox_id: str, target: str | None) -> None:
        """Set or clear the redirect; the server applies it to the next delivery."""
        self._call(f"set redirect of {mailbox_id}",
                   lambda: self.store.set_redirect(mailbox_id, target))

    def set_redirects(self, redirects: dict[str, str | None]) -> None:
        """Several redirects in one transaction of the system's store."""
        self._call(f"set redirects of {len(redirects)} mailboxes",
                   lambda: self.store.set_redirects(redirects))

    def set_via_fed_many(self, mailbox_ids: list[str], value: bool) -> None:
        """`set_via_fed` for several mailboxes in one transaction of the system's store."""
        self._call(f"set via_fed of {len(mailbox_ids)} mailboxes",
                   lambda: self.store.set_via_fed_many(mailbox_ids, value))

    def set_via_fed(self, mailbox_id: str, value: bool) -> None:
        """Local users' mail for the mailbox's addresses goes through fed (or not)."""
        self._call(f"set via_fed of {mailbox_id}",
                   lambda: self.store.set_via_fed(mailbox_id, value))

    def set_syncfed(self, mailbox_id: str, value: bool) -> None:
        """Set or clear the syncfed marker."""
        self._call(f"set syncfed of {mailbox_id}",
                   lambda: self.store.set_syncfed(mailbox_id, value))

    def delete_mailbox(self, mailbox_id: str) -> None:
        """Remove account and data; missing is a no-op."""
        self._call(f"delete {mailbox_id}", lambda: self.store.delete_account(mailbox_id))

    # -- contacts table and address book -------------------------------------------------
    def put_contact(self, contact: Contact) -> None:
        """Insert or replace a contact."""
        self._call(f"put contact {contact.address}",
                   lambda: self.store.put_contact(contact.address, contact.addresses))

    def list_contacts(self) -> list[Contact]:
        """The contacts table TC."""
        return [Contact(a, tuple(b)) for a, b in self._call("list contacts", self.store.contacts)]

    def delete_contact(self, address: str) -> None:
        """Remove a contact; missing is a no-op."""
        self._call(f"delete contact {address}", lambda: self.store.delete_contact(address))

    def apply_address_book(self, entries: dict[str, str]) -> None:
        """Replace the address book (down-sync)."""
        self._call("apply address book", lambda: self.store.replace_address_book(entries))

    def address_book(self) -> dict[str, str]:
        """The address book as last down-synced."""
        return self._call("read address book", self.store.address_book)

    # -- data -----------------------------------------------------------------------------
    def mailbox_info(self, mailbox_id: str) -> MailboxInfo:
        """Type "maildir", bytes and message count over every folder."""
        size, count = self._call(f"size of {mailbox_id}",
                                 lambda: self.store.mailbox_size(mailbox_id))
        return MailboxInfo("maildir", size, count)

    def list_folders(self, mailbox_id: str) -> list[str]:
        """INBOX and every subfolder."""
        return self._call(f"folders of {mailbox_id}", lambda: self.store.folders(mailbox_id))

    def create_folder(self, mailbox_id: str, folder: str) -> None:
        """Create a folder if missing (beyond the interface: lets the mover keep empty ones)."""
        self._call(f"create folder {folder} in {mailbox_id}",
                   lambda: self.store.folder_dir(mailbox_id, folder, create=True))

    def list_messages(self, mailbox_id: str, folder: str) -> list[StoredMessage]:
        """Every message of a folder, hashed by streaming."""
        files = self._call(f"list {mailbox_id}/{folder}",
                           lambda: self.store.messages(mailbox_id, folder))
        return [StoredMessage(f.folder, f.key, f.flags, f.mtime, f.size, f.sha256, f.message_id)
                for f in files]

    def read_message(self, mailbox_id: str, folder: str, key: str) -> bytes:
        """Exact bytes of one message."""
        return self._call(f"read {mailbox_id}/{folder}/{key}",
                          lambda: self.store.read(mailbox_id, folder, key))

    def append_message(
        self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
        internal_date: float | None = None,
    ) -> str:
        """Store byte-for-byte with flags and INTERNALDATE; folder created if missing."""
        return self._call(f"append to {mailbox_id}/{folder}", lambda: self.store.append(
            mailbox_id, folder, data, flags=flags, internal_date=internal_date))

    def read_diary(self, mailbox_id: str) -> bytes | None:
        """calendar.ics of the mailbox, or None."""
        return self._call(f"read diary of {mailbox_id}", lambda: self.store.read_diary(mailbox_id))

    def write_diary(self, mailbox_id: str, data: bytes) -> None:
        """Replace calendar.ics atomically."""
        self._call(f"write diary of {mailbox_id}",
                   lambda: self.store.write_diary(mailbox_id, data))
