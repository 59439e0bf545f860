"""Uploading the user's local mail straight into the new mailbox over IMAP (E30), and the IMAP
login test of the switched account (E31).

Why IMAP from the workstation. When the target system speaks IMAP (Dovecot), the user's own
mail client will read BOX2 over IMAP; uploading over the same protocol with the user's own
credentials writes exactly what the client will see, needs no privileged path through the
reconciler and keeps gigabytes of archives off the station API. Where the target has no IMAP
(the embedded maildir system) the agent uploads through the station API instead.

What is preserved. APPEND carries the raw message, its flags (Maildir letters S R F D P ->
\\Seen \\Answered \\Flagged \\Draft $Forwarded; T is not sent: a message marked deleted would
vanish at the next EXPUNGE), Thunderbird's tags as keywords (`$label1`..`$label5` and user
tags, from `X-Mozilla-Keys`: Thunderbird reads the same keys back from an IMAP server) and
its INTERNALDATE (the mbox `From ` line's date). Folders are
created as needed under `Local Folders/...`, their names encoded in modified UTF-7 (RFC 3501
5.1.3) and joined with the server's hierarchy separator; a name part that contains the
server's separator gets it replaced by `_` (logged), or it would split into two levels.

Why it never uploads twice. The manifest (`localdata.Manifest`) holds one line per message
acknowledged by the server. A crash *between* the server's OK and the manifest line would
leave one message uncertain; so before each APPEND an intent line is written, and a run that
finds an intent without its acknowledgement looks at the last few messages of that folder
(the one in doubt is the newest one we appended there) and compares their bytes (line ends
normalised: the server stores CRLF) before deciding to append.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from mailferry.mail.imap import flags as maildir_flags
from mailferry.mail.imap import mutf7
from mailferry.mail.imap.blocking import BlockingImap, Tls
from mailferry.mail.imap.client import ImapCommandError, ImapTlsError
from mailferry.mail.imap.client import ImapError as ClientError
from mailferry.mail.imap.quoting import quote
from mailferry.mail.oauth2 import OAuth2Error, TokenSource
from station_agent.localdata import LocalMessage, Manifest, valid_keyword

log = logging.getLogger("station_agent")

IMAP_TIMEOUT = 30.0
RECHECK_LAST = 5
T = TypeVar("T")


class ImapError(Exception):
    """The IMAP server could not be reached, refused the login or an operation."""


@dataclass(frozen=True)
class ImapAccount:
    """Where and as whom to log in."""

    host: str
    port: int
    tls: str  # none | starttls | tls
    user: str
    password: str
    ca_file: str | None = None
    oauth: TokenSource | None = None  # a bearer token instead of the password (OAUTHBEARER)

    def __repr__(self) -> str:  # never the password
        return f"ImapAccount({self.user}@{self.host}:{self.port})"


def _mode(tls: str) -> Tls:
    """The shared client's TLS mode for the agent's setting (none | starttls | tls)."""
    return "implicit" if tls == "tls" else "starttls" if tls == "starttls" else "none"


def _text(exc: BaseException, where: str = "") -> str:
    """The reason, without the client's own ``IMAP host:port: `` in front of it."""
    text = str(exc) or type(exc).__name__
    return text.removeprefix(f"{where}: ") if where else text


def connect(account: ImapAccount, timeout: float = IMAP_TIMEOUT) -> BlockingImap:
    """Connected (TLS as configured) and logged in; ImapError with the reason otherwise."""
    where = f"IMAP {account.host}:{account.port}"
    stage = "STARTTLS" if account.tls == "starttls" else "connect"
    try:
        conn = BlockingImap.connect(account.host, account.port, tls=_mode(account.tls),
                                    cafile=account.ca_file, timeout=timeout)
    except ImapTlsError as exc:
        raise ImapError(f"{where} {stage} failed: {_text(exc, where)}") from None
    except ClientError as exc:
        raise ImapError(f"{where} connect failed: {_text(exc, where)}") from None
    try:
        if account.oauth is not None:
            conn.login_oauth(account.user, account.oauth)
        else:
            conn.login(account.user, account.password)
    except ClientError as exc:
        conn.logout()
        how = f"AUTHENTICATE {account.oauth.mechanism.upper()}" if account.oauth else "LOGIN"
        raise ImapError(f"{where} {how} failed: {_text(exc, where)}") from None
    except OAuth2Error as exc:  # no token: the endpoint and the step, never a secret
        conn.logout()
        raise ImapError(f"{where} login: no OAuth2 token: {exc}") from None
    return conn


def reachable(host: str, port: int, tls: str, ca_file: str | None = None,
              timeout: float = IMAP_TIMEOUT) -> str | None:
    """None if the IMAP server greets (and TLS works as configured), else why not."""
    try:
        conn = BlockingImap.connect(host, port, tls=_mode(tls), cafile=ca_file,
                                    timeout=timeout)
    except ClientError as exc:
        return _text(exc, f"IMAP {host}:{port}")
    conn.logout()
    return None


def login_test(account: ImapAccount) -> tuple[bool, str]:
    """E31: log in as the switched client will and open INBOX; (ok, what happened)."""
    try:
        conn = connect(account)
    except ImapError as exc:
        return False, str(exc)
    try:
        selected = conn.select("INBOX", readonly=True)
        return True, f"IMAP {account.host}:{account.port} login as {account.user} and " \
                     f"SELECT INBOX ok ({selected.exists} messages)"
    except ImapCommandError as exc:
        return False, f"IMAP SELECT INBOX answered {exc.status} {exc.text}"
    except ClientError as exc:
        return False, f"IMAP SELECT INBOX failed: {_text(exc, conn.where)}"
    finally:
        conn.logout()


def _normalised_sha(data: bytes) -> str:
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


class Uploader:
    """One IMAP session appending local messages into `Local Folders/...` of the mailbox."""

    def __init__(self, conn: BlockingImap, manifest: Manifest) -> None:
        self.conn = conn
        self.manifest = manifest
        self.separator = self._separator()
        self.existing = self._list()
        self.created: list[str] = []
        self.refused_keywords: set[str] = set()

    def _check(self, what: str, command: Callable[[], T]) -> T:
        try:
            return command()
        except ImapCommandError as exc:
            raise ImapError(f"IMAP {what} answered {exc.status}: {exc.text}") from None

    def _separator(self) -> str:
        for resp in self._check('LIST "" ""', lambda: self.conn.command('LIST "" ""')):
            if len(resp) > 2 and resp[0] == b"LIST":
                sep = resp[2]
                return sep.decode() if isinstance(sep, bytes) and sep else "/"
        return "/"

    def _list(self) -> set[str]:
        names: set[str] = set()
        for resp in self._check("LIST", lambda: self.conn.command('LIST "" "*"')):
            if len(resp) > 3 and resp[0] == b"LIST" and isinstance(resp[3], bytes):
                names.add(resp[3].decode(errors="replace"))
        return names

    def mailbox_name(self, folder: str) -> str:
        """`Local Folders/Archive/2019` as this server spells it (separator, mUTF-7)."""
        parts = []
        for part in folder.split("/"):
            if self.separator != "/" and self.separator in part:
                log.warning("folder part %r contains the server's separator %r: stored as %r",
                            part, self.separator, part.replace(self.separator, "_"))
                part = part.replace(self.separator, "_")
            parts.append(mutf7.encode(part))
        return self.separator.join(parts)

    def ensure(self, folder: str) -> str:
        """Create the mailbox (and its parents) if missing; return its IMAP name."""
        name = self.mailbox_name(folder)
        if name in self.existing:
            return name
        parts = name.split(self.separator)
        for depth in range(1, len(parts) + 1):
            partial = self.separator.join(parts[:depth])
            if partial in self.existing:
                continue
            try:
                self.conn.command(f"CREATE {quote(partial)}")
            except ImapCommandError as exc:
                if partial not in self._list():
                    raise ImapError(f"IMAP CREATE {partial} answered {exc.status}: "
                                    f"{exc.text}") from None
            with contextlib.suppress(ImapCommandError):  # as before: a refusal is harmless
                self.conn.command(f"SUBSCRIBE {quote(partial)}")
            self.existing.add(partial)
            self.created.append(mutf7.decode(partial))
        return name

    def _already_there(self, name: str, message: LocalMessage) -> bool:
        """After a crash: is `message` among the last messages of mailbox `name`?"""
        try:
            total = self.conn.select(name, readonly=True).exists
        except ImapCommandError:
            return False
        if total == 0:
            return False
        first = max(1, total - RECHECK_LAST + 1)
        fetched = self._check("FETCH", lambda: self.conn.fetch(f"{first}:{total}",
                                                               "(BODY.PEEK[])"))
        wanted = _normalised_sha(message.data)
        bodies = [item.get(b"BODY[]") for item in fetched]
        return any(isinstance(body, bytes) and _normalised_sha(body) == wanted
                   for body in bodies)

    def _keywords(self, message: LocalMessage) -> list[str]:
        """The message's Thunderbird tags that can be IMAP keywords (the others logged)."""
        kept = [key for key in message.keywords if valid_keyword(key)]
        for key in message.keywords:
            if key not in kept and key not in self.refused_keywords:
                self.refused_keywords.add(key)
                log.warning("Thunderbird tag key %r is not a valid IMAP keyword: messages in "
                            "%s keep everything but this tag", key, message.folder)
        return kept

    def append(self, message: LocalMessage) -> bool:
        """Append one message unless the manifest says it is there; True if appended."""
        key = (message.sha256, message.folder)
        if key in self.manifest:
            return False
        name = self.ensure(message.folder)
        if self.manifest.uncertain(*key) and self._already_there(name, message):
            self.manifest.add(*key)
            return False
        flags = [*maildir_flags.to_imap(message.flags, deleted=False), *self._keywords(message)]
        self.manifest.intend(*key)
        self._check(f"APPEND {name}", lambda: self.conn.append(
            name, message.data, flags, message.internal_date))
        self.manifest.add(*key)
        return True


@dataclass
class Progress:
    """Progress lines for the log: every `every` seconds and at each folder's end."""

    total_bytes: int
    every: float = 5.0
    done_bytes: int = 0
    messages: int = 0
    _last: float = 0.0

    def step(self, folder: str, size: int, emit: Callable[[str], None]) -> None:
        self.done_bytes += size
        self.messages += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            emit(self.line(folder))

    def line(self, folder: str) -> str:
        percent = 100 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"local mail upload: {self.messages} message(s), "
                f"{self.done_bytes / 1e6:.1f} of {self.total_bytes / 1e6:.1f} MB "
                f"({percent:.0f} %), now in {folder}")


def upload(account: ImapAccount, items: Iterable[LocalMessage | tuple[str, str]],
           manifest: Manifest, progress: Progress) -> dict[str, Any]:
    """E30 over IMAP: every local message not yet acknowledged; counts for the report."""
    counts: dict[str, Any] = {"messages": 0, "uploaded": 0, "present": 0, "skipped": 0,
                              "expunged": 0, "bytes_uploaded": 0, "via": "imap"}
    folders: set[str] = set()
    conn = connect(account)
    try:
        uploader = Uploader(conn, manifest)
        current = ""
        for item in items:
            if isinstance(item, tuple):
                counts["expunged"] += 1
                continue
            if item.folder != current and current:
                log.info("%s", progress.line(current))
            current = item.folder
            folders.add(item.folder)
            counts["messages"] += 1
            if (item.sha256, item.folder) in manifest:
                counts["skipped"] += 1
            elif uploader.append(item):
                counts["uploaded"] += 1
                counts["bytes_uploaded"] += len(item.data)
            else:
                counts["present"] += 1
            progress.step(item.folder, len(item.data), lambda text: log.info("%s", text))
        if current:
            log.info("%s", progress.line(current))
        counts["created"] = uploader.created
    except ClientError as exc:
        raise ImapError(f"IMAP upload interrupted: {_text(exc, conn.where)}") from None
    finally:
        conn.logout()
    counts["folders"] = sorted(folders)
    return counts
