"""Read and write one mailbox over IMAP: the data plane of the `postfix-dovecot` and `imap` drivers.

Why IMAP rather than files or doveadm: it is the one protocol every mail server speaks, so the
same code reads a Dovecot we administer and a foreign server we only have a login for. It gives
exact message bytes (`BODY.PEEK[]`, never setting \\Seen), flags and INTERNALDATE, and APPEND
stores a message with both, which is all the data mover needs.

Logins: a *master* login authenticates with SASL PLAIN as an admin user and names the
mailbox's login as the authorization identity (RFC 4616), which is how Dovecot master users
and Cyrus admins read any mailbox without its password; a *per-user* login is a plain LOGIN
with the mailbox's own password. A refused login is a TemporaryError that says which server,
which login and that the credentials were refused: the migration waits for an admin to fix the
referenced secret, and picks it up on the next attempt (secrets are read at every login).

Keys: a message's key is `UIDVALIDITY:UID`; a key whose UIDVALIDITY no longer matches is
refused rather than silently reading another message. Folders use '/' as separator whatever
the server's hierarchy delimiter is, without the personal namespace's prefix (Cyrus's
`INBOX.`); other users' and shared namespaces are left out; names are exchanged as the
server lists them (modified UTF-7 is not decoded).
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mailferry.mail.imap import flags as maildir_flags
from mailferry.mail.imap.client import parse_response
from mailferry.mail.imap.quoting import quote, unquote
from mailferry.mail.messageid import message_id_of
from reconciler.drivers.base import StoredMessage, content_sha256
from reconciler.errors import PermanentError, TemporaryError
from reconciler.mover.endpoints import ImapAccount

LIST_RE = re.compile(rb'\((?P<flags>[^)]*)\) (?P<delim>"[^"]*"|NIL) (?P<name>.+)$')
TIMEOUT = 30.0


@dataclass(frozen=True)
class ImapLogin:
    """How to log in to one mailbox: its login, and a password or a master user."""

    login: str
    password: Callable[[], str]  # read at every login (secrets by reference, invariant 7)
    master_user: str | None = None  # SASL PLAIN authcid; `login` is then the authzid


class ImapSession:
    """One logged-in IMAP connection to one mailbox."""

    def __init__(self, where: str, conn: imaplib.IMAP4) -> None:
        self.where = where
        self.conn = conn
        self.delimiter = "/"
        self._selected: str | None = None
        self._uidvalidity = ""
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
        typ, data = self.conn.namespace()
        if typ != "OK" or not data or not isinstance(data[0], bytes):
            return
        parsed = parse_response([b"NAMESPACE " + data[0]])
        personal = parsed[1] if len(parsed) > 1 else None
        if isinstance(personal, list) and personal and isinstance(personal[0], list) \
                and personal[0] and isinstance(personal[0][0], bytes):
            self.prefix = personal[0][0].decode()
        for group in parsed[2:4]:
            for entry in group if isinstance(group, list) else ():
                if isinstance(entry, list) and entry and isinstance(entry[0], bytes) \
                        and entry[0]:
                    self.foreign += (entry[0].decode(),)

    def _ok(self, what: str, result: tuple[str, Any]) -> list[Any]:
        typ, data = result[0], list(result[1] or [])
        if typ != "OK":
            detail = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
            raise TemporaryError(f"{self.where}: {what}: {typ} {detail}")
        return data

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
        for line in self._ok("LIST", self.conn.list('""', "*")):
            if not isinstance(line, bytes):
                continue
            match = LIST_RE.match(line)
            if match is None:
                continue
            if b"\\noselect" in match["flags"].lower() or b"\\nonexistent" in match[
                    "flags"].lower():
                continue
            delim = match["delim"]
            if delim != b"NIL":
                self.delimiter = unquote(delim.decode("utf-8", "replace")) or "/"
            name = unquote(match["name"].decode("utf-8", "replace"))
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
        self._ok(f"CREATE {folder}", self.conn.create(quote(self._server_name(folder))))

    def select(self, folder: str, *, readonly: bool = True) -> None:
        if self._selected == folder:
            return
        typ, _data = self.conn.select(quote(self._server_name(folder)), readonly=readonly)
        if typ != "OK":
            raise PermanentError(f"{self.where}: no folder {folder!r}")
        _, validity = self.conn.response("UIDVALIDITY")
        self._uidvalidity = (validity[0] or b"0").decode() if validity and isinstance(
            validity[0], bytes) else "0"
        self._selected = folder

    # -- messages --------------------------------------------------------------------------
    def messages(self, folder: str) -> list[StoredMessage]:
        """Every message of the folder with flags, INTERNALDATE, size and SHA-256."""
        self.select(folder)
        data = self._ok("UID SEARCH", self.conn.uid("SEARCH", "ALL"))
        uids = [int(u) for u in (data[0] or b"").split()] if isinstance(data[0], bytes) else []
        result = []
        for uid in uids:  # one at a time: no whole folder in memory
            body, flags, date = self._fetch(uid)
            result.append(StoredMessage(
                folder=folder, key=f"{self._uidvalidity}:{uid}", flags=flags,
                internal_date=date, size=len(body), sha256=content_sha256(body),
                message_id=message_id_of(body)))
        return result

    def _fetch(self, uid: int) -> tuple[bytes, str, float]:
        data = self._ok(f"UID FETCH {uid}", self.conn.uid(
            "FETCH", str(uid), "(FLAGS INTERNALDATE BODY.PEEK[])"))
        for part in data:
            if isinstance(part, tuple) and len(part) == 2:
                meta, body = part
                letters = maildir_flags.to_maildir(f.decode() for f in imaplib.ParseFlags(meta))
                stamp = imaplib.Internaldate2tuple(meta)
                date = time.mktime(stamp) if stamp else 0.0
                return bytes(body), letters, date
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
        imap_flags = "(" + " ".join(maildir_flags.to_imap(flags)) + ")"
        when = imaplib.Time2Internaldate(internal_date if internal_date is not None
                                         else time.time())
        self._ok(f"APPEND to {folder}", self.conn.append(
            quote(self._server_name(folder)), imap_flags, when, data))
        self._selected = None  # the folder changed under a SELECT
        _, code = self.conn.response("APPENDUID")
        if code and isinstance(code[0], bytes):
            validity, _, uid = code[0].decode().partition(" ")
            return f"{validity}:{uid}"
        return ""

    def size(self) -> tuple[int, int]:
        """(bytes, messages) over every folder, from RFC822.SIZE."""
        total = count = 0
        for folder in self.folders():
            self.select(folder)
            data = self._ok("FETCH sizes", self.conn.fetch("1:*", "(RFC822.SIZE)")) \
                if self._count() else []
            for line in data:
                if isinstance(line, bytes) and (match := re.search(rb"RFC822\.SIZE (\d+)", line)):
                    total += int(match[1])
                    count += 1
        return total, count

    def _count(self) -> int:
        _, exists = self.conn.response("EXISTS")
        return int(exists[-1]) if exists and isinstance(exists[-1], bytes) else 0


@contextlib.contextmanager
def imap_session(host: str, port: int, tls: str, login: ImapLogin, *,
                 system: str, cafile: str | None = None) -> Iterator[ImapSession]:
    """A logged-in session; TemporaryError naming server, login and reason on any failure."""
    where = f"{system}: IMAP {host}:{port}"
    try:
        if tls == "implicit":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                host, port, timeout=TIMEOUT, ssl_context=ssl.create_default_context(cafile=cafile))
        else:
            conn = imaplib.IMAP4(host, port, timeout=TIMEOUT)
            if tls == "starttls":
                conn.starttls(ssl.create_default_context(cafile=cafile))
    except (OSError, imaplib.IMAP4.error) as exc:
        raise TemporaryError(f"{where} unreachable: {exc}") from exc
    try:
        try:
            password = login.password()
            if login.master_user is not None:
                token = f"{login.login}\0{login.master_user}\0{password}".encode()
                conn.authenticate("PLAIN", lambda _challenge: token)
            else:
                conn.login(login.login, password)
        except imaplib.IMAP4.error as exc:
            who = (f"master user {login.master_user!r} for {login.login!r}"
                   if login.master_user else f"{login.login!r}")
            raise TemporaryError(f"{where}: login as {who} refused (bad credentials?): "
                                 f"{exc}") from exc
        except Exception as exc:  # a secret that cannot be read: same wait, clear message
            if isinstance(exc, TemporaryError):
                raise
            raise TemporaryError(f"{where}: credentials for {login.login!r}: {exc}") from exc
        session = ImapSession(where, conn)
        try:
            yield session
        except (OSError, imaplib.IMAP4.error) as exc:
            raise TemporaryError(f"{where}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            conn.logout()


def imap_account(host: str, port: int, tls: str, login: ImapLogin, *,
                 system: str, cafile: str | None = None) -> ImapAccount:
    """The same login for the data mover's pipelined client (`mover.endpoints`): what makes
    the engine's copies between IMAP systems fast. The secret is read now, as at a login."""
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
        context = ssl.create_default_context(cafile=cafile)
        conn = (imaplib.IMAP4_SSL(host, port, timeout=10, ssl_context=context)
                if tls == "implicit" else imaplib.IMAP4(host, port, timeout=10))
    except (OSError, imaplib.IMAP4.error) as exc:
        raise TemporaryError(f"{where} unreachable: {exc}") from exc
    if tls == "starttls":  # a certificate the copies would refuse makes the server unusable
        try:
            conn.starttls(context)
        except (OSError, imaplib.IMAP4.error) as exc:
            with contextlib.suppress(OSError):  # a failed handshake may have closed it
                conn.shutdown()
            raise TemporaryError(f"{where}: STARTTLS failed: {exc}") from exc
    with contextlib.suppress(Exception):
        conn.logout()
