"""Read and write one mailbox over IMAP: the data plane of the `postfix-dovecot` and `imap` drivers.

Why IMAP rather than files or doveadm: it is the one protocol every mail server speaks, so the
same code reads a Dovecot we administer and a foreign server we only have a login for. It gives
exact message bytes (`BODY.PEEK[]`, never setting \\Seen), flags and INTERNALDATE, and APPEND
stores a message with both, which is all the data mover needs.

Logins: a *master* login authenticates with SASL PLAIN as an admin user and names the
mailbox's login as the authorization identity (RFC 4616), which is how Dovecot master users
and Cyrus admins read any mailbox without its password; a *per-user* login uses the mailbox's
own password (AUTHENTICATE PLAIN when offered, else LOGIN); an *oauth2* login sends a bearer
token (XOAUTH2 or OAUTHBEARER) from `mailferry.mail.oauth2`'s cache. A refused login is a
TemporaryError that says which server, which login and that the credentials were refused: the
migration waits for an admin to fix the referenced secret, and picks it up on the next attempt
(secrets are read at every login).

Keys: a message's key is `UIDVALIDITY:UID`; a key whose UIDVALIDITY no longer matches is
refused rather than silently reading another message. Folders use '/' as separator whatever
the server's hierarchy delimiter is, without the personal namespace's prefix (Cyrus's
`INBOX.`); other users' and shared namespaces are left out; names are exchanged as the
server lists them (modified UTF-7 is not decoded).

The connection is the shared blocking session (`mailferry.mail.imap.blocking`) over the one
IMAP client the mover uses: one parser, one TLS policy, one set of errors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar, cast

from mailferry.mail.imap import flags as maildir_flags
from mailferry.mail.imap.blocking import BlockingImap, Tls
from mailferry.mail.imap.client import ImapCommandError, ImapError, ImapTlsError, as_int
from mailferry.mail.imap.dates import epoch_of
from mailferry.mail.imap.quoting import quote
from mailferry.mail.messageid import message_id_of
from mailferry.mail.oauth2 import OAuth2Error, TokenSource
from reconciler.drivers.base import ImapAccount, StoredMessage, content_sha256
from reconciler.errors import PermanentError, TemporaryError

T = TypeVar("T")
TIMEOUT = 30.0


@dataclass(frozen=True)
class ImapLogin:
    """How to log in to one mailbox: its login, and a password or a master user."""

    login: str
    password: Callable[[], str]  # read at every login (secrets by reference, invariant 7)
    master_user: str | None = None  # SASL PLAIN authcid; `login` is then the authzid
    # OAuth2 instead: a bearer token for `login` from this source (`password` unused)
    oauth: TokenSource | None = None


class ImapSession:
    """One logged-in IMAP connection to one mailbox."""

    def __init__(self, where: str, conn: BlockingImap) -> None:
        self.where = where
        self.conn = conn
        self.delimiter = "/"
        self._selected: str | None = None
        self._uidvalidity = ""
        self._exists = 0
        # The personal namespace's prefix (Cyrus: "INBOX.") and the other users' and shared
        # ones (Cyrus: "user."), from NAMESPACE: names are given without the personal
        # prefix, and folders of other namespaces are not this mailbox's.
        self.prefix = ""
        self.foreign: tuple[str, ...] = ()
        self._namespace_read = False

    def _namespace(self) -> None:
        if self._namespace_read:
            return
        self._namespace_read = True
        if "NAMESPACE" not in self.conn.capabilities:
            return
        try:
            responses = self.conn.command("NAMESPACE")
        except ImapCommandError:
            return
        parsed = next((r for r in responses if r and r[0] == b"NAMESPACE"), None)
        if parsed is None:
            return
        personal = parsed[1] if len(parsed) > 1 else None
        if isinstance(personal, list) and personal and isinstance(personal[0], list) \
                and personal[0] and isinstance(personal[0][0], bytes):
            self.prefix = personal[0][0].decode()
        for group in parsed[2:4]:
            for entry in group if isinstance(group, list) else ():
                if isinstance(entry, list) and entry and isinstance(entry[0], bytes) \
                        and entry[0]:
                    self.foreign += (entry[0].decode(),)

    def _ok(self, what: str, command: Callable[[], T]) -> T:
        """Run one exchange; a NO or BAD is a TemporaryError naming the server and what."""
        try:
            return command()
        except ImapCommandError as exc:
            raise TemporaryError(f"{self.where}: {what}: {exc.status} {exc.text}") from exc

    def _server_name(self, folder: str) -> str:
        self._namespace()
        if folder == "INBOX":
            return "INBOX"
        return self.prefix + folder.replace("/", self.delimiter)

    # -- folders ---------------------------------------------------------------------------
    def folders(self) -> list[str]:
        """Every selectable folder, '/'-separated, INBOX first."""
        self._namespace()
        found: list[str] = []
        for resp in self._ok("LIST", lambda: self.conn.command('LIST "" "*"')):
            if len(resp) < 4 or resp[0] != b"LIST" or not isinstance(resp[1], list) \
                    or not isinstance(resp[3], bytes):
                continue
            attributes = {f.lower() for f in resp[1] if isinstance(f, bytes)}
            if {b"\\noselect", b"\\nonexistent"} & attributes:
                continue
            if isinstance(resp[2], bytes):
                self.delimiter = resp[2].decode("utf-8", "replace") or "/"
            name = resp[3].decode("utf-8", "replace")
            if any(name.startswith(p) for p in self.foreign):
                continue  # another user's folder shared with this one, or a public one
            if self.prefix and name.startswith(self.prefix):
                name = name[len(self.prefix):]
            folder = "INBOX" if name.upper() == "INBOX" else name.replace(self.delimiter, "/")
            found.append(folder)
        return sorted(set(found), key=lambda f: (f != "INBOX", f))

    def create(self, folder: str) -> None:
        """Create a folder unless it exists."""
        if folder == "INBOX" or folder in self.folders():
            return
        name = quote(self._server_name(folder))
        self._ok(f"CREATE {folder}", lambda: self.conn.command(f"CREATE {name}"))

    def select(self, folder: str, *, readonly: bool = True) -> None:
        if self._selected == folder:
            return
        try:
            selected = self.conn.select(self._server_name(folder), readonly=readonly)
        except ImapCommandError:
            raise PermanentError(f"{self.where}: no folder {folder!r}") from None
        self._uidvalidity = selected.uidvalidity or "0"
        self._exists = selected.exists
        self._selected = folder

    # -- messages --------------------------------------------------------------------------
    def messages(self, folder: str) -> list[StoredMessage]:
        """Every message of the folder with flags, INTERNALDATE, size and SHA-256."""
        self.select(folder)
        uids: list[int] = []
        for resp in self._ok("UID SEARCH", lambda: self.conn.command("UID SEARCH ALL")):
            if resp and resp[0] == b"SEARCH":
                uids += [int(u) for u in resp[1:] if isinstance(u, bytes) and u.isdigit()]
        result = []
        for uid in uids:  # one at a time: no whole folder in memory
            body, flags, date = self._fetch(uid)
            result.append(StoredMessage(
                folder=folder, key=f"{self._uidvalidity}:{uid}", flags=flags,
                internal_date=date, size=len(body), sha256=content_sha256(body),
                message_id=message_id_of(body)))
        return result

    def _fetch(self, uid: int) -> tuple[bytes, str, float]:
        found = self._ok(f"UID FETCH {uid}", lambda: self.conn.fetch(
            str(uid), "(FLAGS INTERNALDATE BODY.PEEK[])", uid=True))
        for items in found:
            body = items.get(b"BODY[]")
            if isinstance(body, bytes) and as_int(items.get(b"UID")) == uid:
                flags = items.get(b"FLAGS")
                letters = maildir_flags.to_maildir(
                    f.decode() for f in (flags if isinstance(flags, list) else ())
                    if isinstance(f, bytes))
                stamp = items.get(b"INTERNALDATE")
                date = epoch_of(stamp.decode() if isinstance(stamp, bytes) else None)
                return bytes(body), letters, date or 0.0
        raise PermanentError(f"{self.where}: message UID {uid} is gone")

    def read(self, folder: str, key: str) -> bytes:
        """Exact bytes of the message `key` (UIDVALIDITY:UID)."""
        self.select(folder)
        validity, _, uid = key.partition(":")
        if validity != self._uidvalidity or not uid.isdigit():
            raise PermanentError(f"{self.where}: stale message key {key} in {folder} "
                                 f"(UIDVALIDITY is now {self._uidvalidity})")
        return self._fetch(int(uid))[0]

    def append(self, folder: str, data: bytes, flags: str, internal_date: float | None) -> str:
        """APPEND with flags and INTERNALDATE; the key when the server reports APPENDUID."""
        self.create(folder)
        name = self._server_name(folder)
        when = internal_date if internal_date is not None else time.time()
        stored = self._ok(f"APPEND to {folder}", lambda: self.conn.append(
            name, data, maildir_flags.to_imap(flags), when))
        self._selected = None  # the folder changed under a SELECT
        return f"{stored[0]}:{stored[1]}" if stored else ""

    def size(self) -> tuple[int, int]:
        """(bytes, messages) over every folder, from RFC822.SIZE."""
        total = count = 0
        for folder in self.folders():
            self.select(folder)
            found = self._ok("FETCH sizes", lambda: self.conn.fetch(
                "1:*", "(RFC822.SIZE)")) if self._exists else []
            for items in found:
                if b"RFC822.SIZE" in items:
                    total += as_int(items[b"RFC822.SIZE"])
                    count += 1
        return total, count


class LoginRefused(TemporaryError):
    """The server refused the login itself (not unreachable, not a secret unreadable): on a
    system someone else runs, the mailbox may simply not exist yet."""


def _login_refused(where: str, login: ImapLogin, exc: ImapCommandError) -> TemporaryError:
    who = (f"master user {login.master_user!r} for {login.login!r}"
           if login.master_user else f"{login.login!r}")
    if login.oauth is not None:
        who += f" with an OAuth2 token ({login.oauth.mechanism.upper()})"
    return LoginRefused(f"{where}: login as {who} refused (bad credentials?): "
                        f"{exc.status} {exc.text}")


@contextlib.contextmanager
def imap_session(host: str, port: int, tls: str, login: ImapLogin, *,
                 system: str, cafile: str | None = None) -> Iterator[ImapSession]:
    """A logged-in session; TemporaryError naming server, login and reason on any failure."""
    where = f"{system}: IMAP {host}:{port}"
    try:
        conn = BlockingImap.connect(host, port, tls=_mode(tls), cafile=cafile, timeout=TIMEOUT)
    except ImapError as exc:
        raise TemporaryError(f"{where} unreachable: {exc}") from exc
    try:
        try:
            if login.oauth is not None:
                conn.login_oauth(login.login, login.oauth)
            elif login.master_user is not None:
                conn.login(login.master_user, login.password(), authorize_as=login.login)
            else:
                conn.login(login.login, login.password())
        except ImapCommandError as exc:
            raise _login_refused(where, login, exc) from exc
        except OAuth2Error as exc:  # no token: the step and the endpoint, never a secret
            raise TemporaryError(f"{where}: login as {login.login!r}: no OAuth2 token: "
                                 f"{exc}") from None
        except Exception as exc:  # a secret that cannot be read: same wait, clear message
            if isinstance(exc, TemporaryError):
                raise
            raise TemporaryError(f"{where}: credentials for {login.login!r}: {exc}") from exc
        session = ImapSession(where, conn)
        try:
            yield session
        except ImapError as exc:
            raise TemporaryError(f"{where}: {exc}") from exc
    finally:
        conn.logout()


def _mode(tls: str) -> Tls:
    """The client's TLS mode for a spec's `tls` (none, implicit, starttls)."""
    if tls not in ("none", "implicit", "starttls"):
        raise PermanentError(f"IMAP tls: {tls!r} is not none, implicit or starttls")
    return cast(Tls, tls)


def imap_account(host: str, port: int, tls: str, login: ImapLogin, *,
                 system: str, cafile: str | None = None) -> ImapAccount:
    """The same login for the data mover's pipelined client (`mover.endpoints`): what makes
    the engine's copies between IMAP systems fast. The secret is read now, as at a login
    (a token is fetched at each of the mover's logins instead)."""
    if login.oauth is not None:
        return ImapAccount(host, port, login.login, "", tls=tls, system=system, cafile=cafile,
                           oauth=login.oauth)
    try:
        password = login.password()
    except TemporaryError:
        raise
    except Exception as exc:  # a secret that cannot be read: same wait as a refused login
        raise TemporaryError(f"{system}: IMAP {host}:{port}: credentials for "
                             f"{login.login!r}: {exc}") from exc
    if login.master_user is not None:
        return ImapAccount(host, port, login.master_user, password, authorize_as=login.login,
                           tls=tls, system=system, cafile=cafile)
    return ImapAccount(host, port, login.login, password, tls=tls, system=system,
                       cafile=cafile)


def greeting(host: str, port: int, tls: str, *, system: str, cafile: str | None = None) -> None:
    """Connect and read the greeting: TemporaryError naming host:port unless the server answers."""
    where = f"{system}: IMAP {host}:{port}"
    try:
        # With STARTTLS the upgrade is part of it: a certificate the copies would refuse
        # makes the server unusable.
        conn = BlockingImap.connect(host, port, tls=_mode(tls), cafile=cafile, timeout=10)
    except ImapTlsError as exc:
        raise TemporaryError(f"{where}: STARTTLS failed: {exc}" if tls == "starttls"
                             else f"{where} unreachable: {exc}") from exc
    except ImapError as exc:
        raise TemporaryError(f"{where} unreachable: {exc}") from exc
    conn.logout()
