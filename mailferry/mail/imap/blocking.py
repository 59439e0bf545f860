"""A small blocking IMAP session over the one asyncio client (`client.ImapClient`).

Who uses it: the reconciler's IMAP data plane (``reconciler/drivers/imapstore.py``: listing,
reading and appending for the drivers) and the station agent's upload and login test
(``station_agent/imapupload.py``). Both are synchronous code that asks one thing at a time;
they used `imaplib`, a second IMAP implementation with its own parser, its own TLS and its
own errors. Now there is one: the same parser, STARTTLS rules (a required STARTTLS that
fails never sends the password), literal handling (LITERAL+ or a continuation), SASL PLAIN
with an authorization identity, OAuth2 bearer tokens (XOAUTH2, OAUTHBEARER: `login_oauth`)
and watchdog as the mover's.

How: each session runs the client in an event loop of its own, in a private thread
(`mailferry.mail.loopthread.LoopThread`, as the blocking HTTP client does), and every
method hands one coroutine to that loop and waits for its result. A thread per session
rather than ``asyncio.run`` per call: the client's reader task must stay alive between
calls (the connection is one conversation), and a caller may itself be running in an event
loop's thread (``asyncio.to_thread``), where a nested loop cannot run.

Values are the client's parsed responses (`client.Untagged`: bytes, lists, None for NIL);
mailbox names are given and returned as on the wire (modified UTF-7, see `mutf7`), quoted
here. Errors are the client's: `ImapCommandError` for NO/BAD (the session stays usable),
`ImapConnectionError` when the connection broke or went silent for `timeout` seconds,
`ImapTlsError` when TLS could not be had.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

from mailferry.mail.imap.client import (
    ImapClient,
    ImapConnectionError,
    Untagged,
    Value,
    fetch_items,
    pending_text,
)
from mailferry.mail.imap.dates import imap_date
from mailferry.mail.imap.quoting import quote_bytes
from mailferry.mail.loopthread import LoopThread
from mailferry.mail.oauth2 import TokenSource, imap_login

T = TypeVar("T")
Tls = Literal["none", "implicit", "starttls"]
_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT) (\d+)\]", re.IGNORECASE)
_APPENDUID = re.compile(r"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)


@dataclass(frozen=True)
class Selected:
    """What SELECT or EXAMINE said of a mailbox."""

    exists: int
    uidvalidity: str  # "" when the server did not say
    uidnext: str = ""


class BlockingImap:
    """One IMAP connection, used from synchronous code (see the module docstring)."""

    def __init__(self, client: ImapClient, runner: LoopThread) -> None:
        self._client = client
        self._runner = runner

    # -- life ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, host: str, port: int, *, tls: Tls = "none", cafile: str | None = None,
                timeout: float = 30.0) -> BlockingImap:
        """Connected, greeted, TLS as asked (certificates verified against the system's
        roots or `cafile`); not yet logged in."""
        runner = LoopThread(f"imap {host}:{port}")
        try:
            client = runner.run(ImapClient.connect(host, port, timeout=timeout, tls=tls,
                                                   cafile=cafile))
        except BaseException:
            runner.stop()
            raise
        return cls(client, runner)

    def __enter__(self) -> BlockingImap:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.logout()

    def logout(self) -> None:
        """Say goodbye, close the connection and end the session's thread (idempotent)."""
        if self._runner.alive:
            with contextlib.suppress(Exception):
                self._run(self._client.logout())
            self._runner.stop()

    close = logout

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._runner.alive:  # logged out, or inherited through fork
            coro.close()
            raise ImapConnectionError(f"{self._client.where}: session closed")
        return self._runner.run(coro)

    # -- state -----------------------------------------------------------------------------
    @property
    def capabilities(self) -> set[str]:
        """The server's capabilities, upper-cased (they change at login)."""
        return set(self._client.capabilities)

    @property
    def greeting(self) -> bytes:
        return self._client.greeting

    @property
    def where(self) -> str:
        """``IMAP host:port``, for messages."""
        return self._client.where

    # -- commands ----------------------------------------------------------------------------
    def login(self, user: str, password: str, *, authorize_as: str | None = None) -> None:
        """AUTHENTICATE PLAIN (with an authorization identity: a master or admin user acting
        as `authorize_as`) when offered or needed, else LOGIN; ImapCommandError if refused."""
        self._run(self._client.login(user, password, authorize_as=authorize_as))

    def login_oauth(self, user: str, tokens: TokenSource) -> None:
        """AUTHENTICATE XOAUTH2 or OAUTHBEARER (`tokens.mechanism`) with a token from
        `tokens`, a refused one replaced once (`oauth2.imap_login`); ImapCommandError if
        refused, OAuth2Error when no token could be had."""
        self._run(imap_login(self._client, user, tokens))

    def command(self, line: str) -> list[Untagged]:
        """Run one command without literals; its untagged responses."""
        return self._run(self._client.simple(line))

    def select(self, mailbox: str, *, readonly: bool = True) -> Selected:
        """EXAMINE (`readonly`) or SELECT a mailbox given by its wire name."""
        verb = "EXAMINE" if readonly else "SELECT"
        exists, codes = 0, {b"UIDVALIDITY": "", b"UIDNEXT": ""}
        for resp in self.command(f"{verb} {quote_bytes(mailbox).decode()}"):
            if len(resp) > 1 and resp[1] == b"EXISTS" and isinstance(resp[0], bytes) \
                    and resp[0].isdigit():
                exists = int(resp[0])
            elif resp and resp[0] == b"OK" and len(resp) > 1 and isinstance(resp[1], bytes):
                match = _CODE.match(resp[1] + b" " + _atom(resp, 2))
                if match:
                    codes[match.group(1).upper()] = match.group(2).decode()
        return Selected(exists, codes[b"UIDVALIDITY"], codes[b"UIDNEXT"])

    def fetch(self, sequence: str, items: str, *, uid: bool = False) -> list[dict[bytes, Value]]:
        """FETCH (UID FETCH with `uid`): the attributes of each message, keys upper-cased."""
        found = []
        for resp in self.command(f"{'UID ' if uid else ''}FETCH {sequence} {items}"):
            attributes = fetch_items(resp)
            if attributes is not None:
                found.append(attributes)
        return found

    def append(self, mailbox: str, data: bytes, flags: Sequence[str] = (),
               internal_date: float | None = None) -> tuple[str, str] | None:
        """APPEND a message with its flags and INTERNALDATE; (UIDVALIDITY, UID) when the
        server says where it stored it (UIDPLUS), else None."""
        head = b"APPEND " + quote_bytes(mailbox) + b" (" + " ".join(flags).encode() + b")"
        if internal_date is not None:
            head += b' "' + imap_date(internal_date).encode() + b'"'

        async def append() -> str:
            pending = await self._client.start([head + b" ", data, b""], "APPEND")
            await self._client.finish(pending)
            return pending_text(pending)

        match = _APPENDUID.search(self._run(append()))
        return (match.group(1), match.group(2)) if match else None


def _atom(resp: Untagged, index: int) -> bytes:
    value = resp[index] if len(resp) > index else None
    return value if isinstance(value, bytes) else b""
