"""The one interface every mail system driver implements.

A *system* (patent: messaging service system S1, S2) hosts mailboxes. The reconciler never
touches a system except through this interface, so that the embedded `maildir` system, a
Postfix + Dovecot system and a generic IMAP source are interchangeable in every step.

Vocabulary (see DESIGN.md):

- *mailbox id*: the system-local name of a mailbox; mailferry derives it from the access
  address (``jean.dupont@corp.example`` -> ``jean.dupont=corp.example``).
- *physical address* (ADP): where a mailbox really is, written as an address so that fed can
  route to it: ``<mailbox id>@<system name>.invalid``. fed delivers to it over LMTP; the
  ``.invalid`` TLD guarantees it never leaks to the outside world.
- *internal address* (AD2): BOX2's address reachable only inside the target system before
  the cutover (``<local part>@<internal domain>``).
- *redirect*: an address (usually a physical address) that the system re-submits every
  message of this mailbox to, through fed, instead of storing it.

Every mutating method is idempotent: called twice with the same arguments it leaves the
system as one call would, so that a step killed half-way can simply run again.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field

# The address vocabulary of this interface comes from the one parser (re-exported for the
# drivers and their callers).
from mailferry.mail.addresses import PHYSICAL_TLD, mailbox_id_for, physical_address, split_physical
from mailferry.mail.oauth2 import TokenSource

__all__ = ["PHYSICAL_TLD", "Account", "Contact", "DeliveryEndpoint", "ImapAccount",
           "MailSystemDriver",
           "MailboxInfo", "StoredMessage", "content_sha256", "mailbox_id_for",
           "physical_address", "split_physical"]


def content_sha256(data: bytes) -> str:
    """The digest the mover compares: SHA-256 of the message with CRLF read as LF.

    Line endings are left out because IMAP always transports CRLF while Maildir files may hold
    bare LF: one message must keep one digest whichever driver lists it."""
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


@dataclass(frozen=True)
class ImapAccount:
    """How to log in to one mailbox on an IMAP server: what an IMAP-backed driver's
    `imap_account(mailbox_id)` gives the mover (its password resolved from a reference by
    the driver, never read from the specs; `authorize_as` logs in as an admin or master
    user on behalf of the mailbox's owner)."""

    host: str
    port: int
    user: str
    password: str
    authorize_as: str | None = None  # log in as `user` (an admin) on behalf of this mailbox
    timeout: float = 60.0
    # "none", "implicit" (IMAPS, port 993) or "starttls" (required: no login in cleartext);
    # True/False are accepted for "implicit"/"none"
    tls: bool | str = False
    cafile: str | None = None  # CA bundle for the server's certificate (else system roots)
    system: str = ""  # the mail system's name, for messages
    # OAuth2 instead of the password: a bearer token from this source (XOAUTH2 or
    # OAUTHBEARER, `mailferry.mail.oauth2`), fetched and refreshed at each login
    oauth: TokenSource | None = None

    @property
    def where(self) -> str:
        """The server as errors name it: "system: IMAP host:port"."""
        return f"{self.system + ': ' if self.system else ''}IMAP {self.host}:{self.port}"

    def __repr__(self) -> str:  # never print the password
        who = f"{self.user}->{self.authorize_as}" if self.authorize_as else self.user
        return f"ImapAccount({who}@{self.host}:{self.port})"


@dataclass(frozen=True)
class Account:
    """One mailbox's entry in a system's account table."""

    mailbox_id: str
    physical_address: str
    access_addresses: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    internal_address: str | None = None
    redirect_to: str | None = None
    syncfed: bool = False

    @property
    def all_addresses(self) -> tuple[str, ...]:
        """Every address this mailbox answers to from outside (access addresses + aliases)."""
        return self.access_addresses + self.aliases


@dataclass(frozen=True)
class Contact:
    """A row of the contacts table TC: an access address and the addresses that go with it."""

    address: str
    addresses: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class StoredMessage:
    """One message in a mailbox folder, as listed (no body)."""

    folder: str
    key: str
    flags: str  # Maildir flag letters, sorted: D F P R S T
    internal_date: float  # seconds since the epoch
    size: int
    sha256: str  # content_sha256 of the bytes
    message_id: str | None = None


@dataclass(frozen=True)
class MailboxInfo:
    """What E23 reports and the plan shows: type and size of a mailbox."""

    mailbox_type: str
    size_bytes: int
    messages: int


@dataclass(frozen=True)
class DeliveryEndpoint:
    """Where fed delivers mail for this system's physical addresses."""

    host: str
    port: int
    protocol: str = "lmtp"  # "lmtp" or "smtp"
    tls: str = "none"  # "starttls" or "implicit": fed requires it, verifies the certificate
    cafile: str | None = None  # the CA file fed verifies it with (None: system roots)
    auth_user: str | None = None  # SMTP AUTH as this user (a hosted target's submission)
    auth_file: str | None = None  # ... the file fed reads its password from
    rcpt: str = ""  # RCPT TO format of the mailbox's address; "": the physical address


class MailSystemDriver(abc.ABC):
    """Administer and read one mail system. Raise TemporaryError when it is unreachable."""

    name: str
    # False for a system whose mailboxes someone else provisions (a hosted target): E2
    # finds the mailbox instead of creating it, and moves only into one that is empty or
    # holds nothing but what this migration copied (`steps.prestage.check_target_empty`).
    creates_mailboxes: bool = True

    # -- health -------------------------------------------------------------------------
    @abc.abstractmethod
    def ping(self) -> None:
        """Raise TemporaryError (with the reason) unless the system answers."""

    @abc.abstractmethod
    def delivery_endpoint(self) -> DeliveryEndpoint:
        """Where fed must deliver this system's mail."""

    # -- accounts -----------------------------------------------------------------------
    @abc.abstractmethod
    def list_accounts(self) -> list[Account]:
        """Every mailbox of the system (the up-sync content)."""

    @abc.abstractmethod
    def get_account(self, mailbox_id: str) -> Account | None:
        """The account of `mailbox_id`, or None."""

    @abc.abstractmethod
    def create_mailbox(
        self, mailbox_id: str, *, internal_address: str | None = None,
        access_addresses: tuple[str, ...] = (), redirect_to: str | None = None,
    ) -> Account:
        """Create the mailbox if missing (existing: left as is) and return its account."""

    @abc.abstractmethod
    def set_addresses(
        self, mailbox_id: str, access_addresses: tuple[str, ...], aliases: tuple[str, ...]
    ) -> None:
        """Make these exactly the access addresses and aliases of the mailbox."""

    @abc.abstractmethod
    def set_redirect(self, mailbox_id: str, target: str | None) -> None:
        """Redirect every message of the mailbox to `target` (None: store locally again)."""

    def set_redirects(self, redirects: dict[str, str | None]) -> None:
        """`set_redirect` for the mailboxes that exist and are not redirected so already (a
        wave's E9, inside its hold, where every call lengthens it); a driver that can make
        them one transaction does."""
        for mailbox_id, target in redirects.items():
            account = self.get_account(mailbox_id)
            if account is not None and account.redirect_to != target:
                self.set_redirect(mailbox_id, target)

    def set_via_fed_many(self, mailbox_ids: list[str], value: bool) -> None:
        """`set_via_fed` for several mailboxes (a wave's cutover); a driver that can make
        them one transaction does."""
        for mailbox_id in mailbox_ids:
            self.set_via_fed(mailbox_id, value)

    def set_via_fed(self, mailbox_id: str, value: bool) -> None:
        """Route the system's own users' mail for the mailbox's addresses through fed.

        A system that delivers its local users' mail to a local address by itself would, from
        E4 (target) or E5 (source) until the flip, put it where fed's directory does not say,
        past fed's hold. Drivers of such systems turn that off here; the default is for
        systems whose local mail already passes fed (or that mailferry cannot administer)."""
        return None

    def take_config_changes(self) -> list[str]:
        """Changes the driver made to the system's own configuration since the last call
        (a ``postconf -n`` diff, say), for the step's event: an admin sees and can undo
        them. Drivers that change no configuration of someone else's have none."""
        return []

    @abc.abstractmethod
    def set_syncfed(self, mailbox_id: str, value: bool) -> None:
        """Set or clear the syncfed marker (E4)."""

    @abc.abstractmethod
    def delete_mailbox(self, mailbox_id: str) -> None:
        """Remove the mailbox, its data and its account (E41). Missing: no-op."""

    # -- contacts table and address book -------------------------------------------------
    @abc.abstractmethod
    def put_contact(self, contact: Contact) -> None:
        """Record a contact in the contacts table TC (replaces one with the same address)."""

    @abc.abstractmethod
    def list_contacts(self) -> list[Contact]:
        """The contacts table TC."""

    @abc.abstractmethod
    def delete_contact(self, address: str) -> None:
        """Remove a contact from TC. Missing: no-op."""

    @abc.abstractmethod
    def apply_address_book(self, entries: dict[str, str]) -> None:
        """Down-sync: replace the system's address book with `address -> physical address`."""

    @abc.abstractmethod
    def address_book(self) -> dict[str, str]:
        """The system's address book as down-sync last filled it."""

    # -- data -----------------------------------------------------------------------------
    @abc.abstractmethod
    def mailbox_info(self, mailbox_id: str) -> MailboxInfo:
        """Type and size of the mailbox (E23)."""

    @abc.abstractmethod
    def list_folders(self, mailbox_id: str) -> list[str]:
        """Folder names, '/'-separated hierarchy, the inbox as 'INBOX'."""

    @abc.abstractmethod
    def list_messages(self, mailbox_id: str, folder: str) -> list[StoredMessage]:
        """Every message of a folder, with its hash (no bodies kept in memory)."""

    @abc.abstractmethod
    def read_message(self, mailbox_id: str, folder: str, key: str) -> bytes:
        """The raw bytes of one message, exactly as stored."""

    @abc.abstractmethod
    def append_message(
        self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
        internal_date: float | None = None,
    ) -> str:
        """Store a message byte-for-byte (folder created if missing); return its key."""

    @abc.abstractmethod
    def read_diary(self, mailbox_id: str) -> bytes | None:
        """The mailbox's diary (calendar) data as one iCalendar document, or None."""

    @abc.abstractmethod
    def write_diary(self, mailbox_id: str, data: bytes) -> None:
        """Replace the mailbox's diary data with this iCalendar document."""
