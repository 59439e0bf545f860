"""Driver of a generic IMAP server that mailferry can read but not administer: a migration
source, and a target for mailboxes its provider provisions (Microsoft 365, Google Workspace,
a hosting provider; docs/hosted-target.md).

Why a driver for a system we cannot administer: most migrations start on a server nobody
wants to script (a hosted service, an old Exchange or Cyrus). All the patent needs of a
*source* is to know its mailboxes, read them for the data mover, and stop using them once the
address moved. So this driver:

- keeps its own registry (`mailferry.db` in `stateDir`, the same account table as the
  Postfix + Dovecot driver, without the Postfix/Dovecot files): "creating" a mailbox (when the
  specs first place an address on this system) records the address after proving the
  mailbox exists, by logging in to it; that registry is what up-sync sends fed;
- logs in per mailbox, either with a master/admin user (SASL PLAIN with the mailbox's login
  as authorization identity: Dovecot master users, Cyrus admins), with each mailbox's own
  password from a secrets file of ``address password`` lines (never in the specs), or with
  an OAuth2 bearer token (`login: oauth2`: XOAUTH2 or OAUTHBEARER, tokens from the
  provider's token endpoint for one refresh token, one per mailbox from a file of
  ``address refresh-token`` lines, or the application's client credentials; docs/oauth2.md);
- reads and writes mail over IMAP (`imapstore`), so it is a target too: E2 "creates"
  BOX2 by finding it (a login), never by creating an account. A mailbox that does not
  answer yet is a *manual step* (`ManualStep`: "provision jane@corp.example on hosted365"),
  a state of its own in the plan that the engine rechecks, and every step after it waits;
  a mailbox holding mail this migration did not copy is refused
  (`steps.prestage.check_target_empty`);
- records but cannot enforce redirects: BOX1 -> BOX2 after E9 only helps if the old
  system's MX or forwarding points at fed, which is the admin's part (the docs say so);
- on E41 forgets the mailbox but deletes nothing on the server: mailferry has no right to
  remove an account it did not create, and the old system is usually switched off whole.

fed can deliver to such a system only if `smtp` (or `lmtp`) is given: the provider's MX or
submission port, with `smtpTls` (STARTTLS or implicit TLS, verified with `smtpCaFile` or
the system's roots), optional `smtpAuth` (a user and a password file fed reads) and
`smtpRecipient` (the RCPT TO for a mailbox, `{address}`: a hosted system knows no physical
addresses). Without it, mail routed there waits in fed's queue and follows the directory
when the address moves (fed resolves at delivery time).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mailferry import secretfile
from mailferry.mail.addresses import address_of_mailbox, format_address
from mailferry.mail.oauth2 import OAuth2Settings, TokenSource, tokens_for
from reconciler.drivers.accounts import SqliteAccountsMixin
from reconciler.drivers.base import (
    Account,
    DeliveryEndpoint,
    ImapAccount,
    MailboxInfo,
    MailSystemDriver,
    StoredMessage,
)
from reconciler.drivers.contacts import SqliteContactsMixin
from reconciler.drivers.imapstore import (
    ImapLogin,
    ImapSession,
    LoginRefused,
    greeting,
    imap_account,
    imap_session,
)
from reconciler.drivers.pfdovecot_tables import Tables
from reconciler.errors import MailferryError, ManualStep, PermanentError, TemporaryError
from reconciler.secrets import resolve
from reconciler.spec.model import ImapOptions, SecretRef

T = TypeVar("T")


def read_passwords(text: str) -> dict[str, str]:
    """``address password`` lines (``#`` comments, blank lines ignored) -> address -> password."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        address, _, password = line.partition(" ")
        if password.strip():
            found[address.strip().lower()] = password.strip()
    return found


def _line_for(ref: SecretRef, address: str, what: str) -> str:
    """The secret of `address` in a file of ``address secret`` lines named by `ref` (the
    file itself, or a variable holding its path); the error never shows a secret."""
    path = ref.file if ref.file is not None else os.environ.get(ref.env or "", "")
    try:
        text = secretfile.credential_path(path, f"{what}s").read_text(encoding="utf-8")
    except secretfile.SecretError as exc:
        raise MailferryError(str(exc)) from None
    except OSError as exc:
        raise MailferryError(f"{what}s file {path!r}: {exc.strerror}") from None
    secret = read_passwords(text).get(address.lower())
    if secret is None:
        raise MailferryError(f"no {what} for {address} in the {what}s file")
    return secret


class ImapDriver(SqliteAccountsMixin, SqliteContactsMixin, MailSystemDriver):
    """Read and fill mailboxes of any IMAP server; keep mailferry's own registry of them."""

    creates_mailboxes = False  # its provider does; E2 checks the mailbox instead

    def __init__(self, name: str, options: ImapOptions) -> None:
        self.name = name
        self.options = options
        self.tables = Tables(Path(options.state_dir), name, "", "", 0, 0, files=False)

    # -- logins ---------------------------------------------------------------------------
    def _address(self, mailbox_id: str) -> str:
        account = self.get_account(mailbox_id)
        if account is not None and account.access_addresses:
            return account.access_addresses[0]
        return address_of_mailbox(mailbox_id)

    def login_for(self, mailbox_id: str, address: str | None = None) -> ImapLogin:
        """The IMAP login of a mailbox (master user or its own password)."""
        address = address or self._address(mailbox_id)
        login = format_address(self.options.login_format, address)
        if self.options.login == "per-user":
            return ImapLogin(login, lambda: self._user_password(address))
        if self.options.login == "oauth2":
            return ImapLogin(login, lambda: "", oauth=self._tokens(address))
        master = self.options.master
        if master is None:
            raise PermanentError(f"{self.name}: login: master needs masterUser")
        return ImapLogin(login, lambda: resolve(
            master.password, what=f"{self.name} IMAP master user {master.user}"), master.user)

    def imap_account(self, mailbox_id: str, address: str | None = None) -> ImapAccount:
        """The same login for the data mover's pipelined client (master or per-user)."""
        server = self.options.server
        return imap_account(server.host, server.port, self.options.tls,
                            self.login_for(mailbox_id, address), system=self.name,
                            cafile=self.options.cafile)

    def _user_password(self, address: str) -> str:
        ref = self.options.passwords
        if ref is None:
            raise MailferryError("login: per-user needs a passwords file")
        return _line_for(ref, address, "password")

    def _tokens(self, address: str) -> TokenSource:
        """The token cache of this mailbox's logins (login: oauth2): with client credentials
        or one refreshToken, one for the whole system; with refreshTokens, one per mailbox
        (its line of that file, read at each refresh)."""
        o = self.options.oauth2
        if o is None:
            raise PermanentError(f"{self.name}: login: oauth2 needs oauth2 settings")
        what = f"{self.name} OAuth2"
        secret_ref = o.client_secret
        single, per_box = o.refresh_token, o.refresh_tokens
        refresh: Callable[[], str] | None = None
        key = ""
        if o.grant == "refresh_token" and single is not None:
            refresh, key = (lambda: resolve(single, what=f"{what} refresh token")), \
                f"{single.env or single.file}"
        elif o.grant == "refresh_token" and per_box is not None:
            refresh = lambda: _line_for(per_box, address, "refresh token")  # noqa: E731
            key = f"{per_box.env or per_box.file}#{address.lower()}"
        settings = OAuth2Settings(
            token_url=o.token_url, client_id=o.client_id, grant=o.grant,
            client_secret=(lambda: resolve(secret_ref, what=f"{what} client secret"))
            if secret_ref is not None else None,
            refresh_token=refresh, scope=o.scope, mechanism=o.mechanism, cafile=o.cafile,
            refresh_ref=key)
        return tokens_for(settings, where=f"{self.name}: ")

    def _imap(self, mailbox_id: str, fn: Callable[[ImapSession], T],
              address: str | None = None) -> T:
        server = self.options.server
        with imap_session(server.host, server.port, self.options.tls,
                          self.login_for(mailbox_id, address), system=self.name,
                          cafile=self.options.cafile) as session:
            return fn(session)

    def _read(self, what: str, query: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self.tables.read() as conn:
                return query(conn)
        except (OSError, sqlite3.Error) as exc:
            raise TemporaryError(f"{self.name}: {what}: {exc}") from exc

    def _write(self, what: str, change: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self.tables.write() as conn:
                return change(conn)
        except (OSError, sqlite3.Error) as exc:
            raise TemporaryError(f"{self.name}: {what}: {exc}") from exc

    # -- health -------------------------------------------------------------------------
    def ping(self) -> None:
        """The IMAP server answers (logins are checked where a mailbox is used)."""
        server = self.options.server
        greeting(server.host, server.port, self.options.tls, system=self.name,
                 cafile=self.options.cafile)

    def delivery_endpoint(self) -> DeliveryEndpoint:
        """`lmtp` (Cyrus's lmtpd) or `smtp` if given, with its TLS, AUTH and recipient
        format; else the IMAP address, where fed's attempts fail and mail waits."""
        o = self.options
        if o.lmtp is not None:
            return DeliveryEndpoint(o.lmtp.host, o.lmtp.port, "lmtp")
        if o.smtp is None:
            return DeliveryEndpoint(o.server.host, o.server.port, "smtp")
        auth = o.smtp_auth
        return DeliveryEndpoint(
            o.smtp.host, o.smtp.port, "smtp", tls=o.smtp_tls, cafile=o.smtp_cafile,
            auth_user=auth.user if auth is not None else None,
            auth_file=auth.password.file if auth is not None else None,
            rcpt=o.smtp_recipient)

    # -- accounts (mailferry's registry) ----------------------------------------------------
    def create_mailbox(
        self, mailbox_id: str, *, internal_address: str | None = None,
        access_addresses: tuple[str, ...] = (), redirect_to: str | None = None,
    ) -> Account:
        """Register an existing server mailbox after logging in to it (cannot create one):
        a refused login is a ManualStep -- its provider's admin must provision it."""
        if self.get_account(mailbox_id) is None:
            address = access_addresses[0] if access_addresses else None
            who = address or self._address(mailbox_id)
            task = f"provision {who} on {self.name}"
            if self.options.login == "per-user":
                try:
                    self._user_password(who)
                except MailferryError as exc:  # no line for it yet: not provisioned either
                    raise ManualStep(task, f"{exc}; mailferry cannot create mailboxes "
                                     "there") from None
            try:
                self._imap(mailbox_id, lambda s: s.folders(), address)  # proves the login
            except LoginRefused as exc:
                raise ManualStep(task, f"mailferry cannot create mailboxes there; "
                                 f"{exc}") from exc
            self._insert_account(f"register {mailbox_id}", mailbox_id, internal_address,
                                 access_addresses, redirect_to)
        account = self.get_account(mailbox_id)
        assert account is not None
        return account

    def delete_mailbox(self, mailbox_id: str) -> None:
        """Forget the mailbox; nothing is deleted on the server."""
        self._write(f"forget {mailbox_id}", lambda conn: conn.execute(
            "DELETE FROM accounts WHERE mailbox_id = ?", (mailbox_id,)))

    # -- data -----------------------------------------------------------------------------
    def mailbox_info(self, mailbox_id: str) -> MailboxInfo:
        """Type "imap", bytes and messages over every folder."""
        size, count = self._imap(mailbox_id, lambda s: s.size())
        return MailboxInfo("imap", size, count)

    def list_folders(self, mailbox_id: str) -> list[str]:
        """Every selectable folder."""
        return self._imap(mailbox_id, lambda s: s.folders())

    def create_folder(self, mailbox_id: str, folder: str) -> None:
        """Create a folder if missing."""
        self._imap(mailbox_id, lambda s: s.create(folder))

    def list_messages(self, mailbox_id: str, folder: str) -> list[StoredMessage]:
        """Every message of a folder, hashed."""
        return self._imap(mailbox_id, lambda s: s.messages(folder))

    def read_message(self, mailbox_id: str, folder: str, key: str) -> bytes:
        """Exact bytes of one message."""
        return self._imap(mailbox_id, lambda s: s.read(folder, key))

    def append_message(
        self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
        internal_date: float | None = None,
    ) -> str:
        """IMAP APPEND with flags and INTERNALDATE."""
        return self._imap(mailbox_id, lambda s: s.append(folder, data, flags, internal_date))

    def read_diary(self, mailbox_id: str) -> bytes | None:
        """IMAP has no calendars: None (a diary, if any, stays where it is)."""
        return None

    def write_diary(self, mailbox_id: str, data: bytes) -> None:
        """Refused: this system cannot store diary data."""
        raise PermanentError(f"{self.name}: an IMAP system cannot store diary data")
