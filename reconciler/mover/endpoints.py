"""Sources and targets of a copy: any IMAP server, or any `MailSystemDriver`.

Why an endpoint layer: the copy algorithm (`pipeline.py`) must not care whether BOX1 is on
an IMAP server reached with a master user, or in the embedded maildir system read from
disk, nor whether BOX2 is the one or the other. Each endpoint offers the same five async
operations on *canonical* folder names (see `folders.py`): list the folders, list one
folder's messages (metadata only), stream chosen messages' bytes, append a batch, create a
folder. A listing carries a *validity*: IMAP's UIDVALIDITY, or a constant for a driver
whose keys never change meaning; the manifest trusts cached UID -> hash entries only under
the same validity.

Content identity is the sha256 of the message in its wire form (lines ending in CRLF, as
IMAP serves every message), so a message copied from a Maildir file with bare LF to an
IMAP server, which stores and serves it with CRLF, is still recognised as the same one.
The bytes appended are exactly the bytes read: the mover never rewrites a message.

Credentials: `ImapAccount` (in `reconciler.drivers.base`, the drivers give it) holds a
password resolved from a reference (environment variable or file) by the caller, never read
from the specs; `authorize_as` logs in as an admin or master user on behalf of the mailbox's
owner (SASL PLAIN authorization id, what Dovecot master users, Cyrus admins and Zimbra
admins accept). Or, with `oauth`, a bearer token (XOAUTH2 or OAUTHBEARER) from the one
token cache (`mailferry.mail.oauth2`): each login takes a token valid for a while yet, so a
mailbox retried after its token expired (a reconnect mid-copy) logs in with a fresh one
and resumes from the manifest; a refused token is replaced once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailferry.mail import oauth2
from mailferry.mail.imap import flags as maildir_flags
from mailferry.mail.imap import mutf7
from mailferry.mail.imap.client import (
    Digest,
    ImapClient,
    ImapCommandError,
    ImapConnectionError,
    ImapError,
    ImapLoginError,
    Literal,
    LiteralOut,
    Pending,
    Untagged,
    as_int,
    fetch_items,
    has_bare_lf,
    pending_text,
)
from mailferry.mail.imap.dates import epoch_of, imap_date
from mailferry.mail.imap.quoting import quote_mailbox
from mailferry.mail.messageid import message_id_of
from reconciler.drivers.base import ImapAccount, MailSystemDriver
from reconciler.mover.folders import ATTRIBUTES, Folder, canonical, guess_special_use, native
from reconciler.mover.gmail import GmailLabels
from reconciler.mover.listing import Entry, Listing
from reconciler.mover.pace import SystemPace
from reconciler.mover.pool import ConnectionPool, Idle

# (uid, raw bytes, flags and INTERNALDATE when the fetch carried them, else None)
Sink = Callable[[str, bytes, "tuple[str, ...] | None", "str | None"], Awaitable[None]]
# A big body about to arrive (uid, flags, INTERNALDATE, size): a coroutine function that
# streams its `Literal` on (into an APPEND) and returns its `Digest`, or None (read whole).
BodyStreamer = Callable[[str, "tuple[str, ...]", "str | None", int],
                        "Callable[[Literal], Awaitable[bytes]] | None"]
# The announcing line of a body whose flags and date came before it (Dovecot's order for
# `UID FLAGS INTERNALDATE BODY.PEEK[]`); another order is read whole, never streamed.
_BODY_AHEAD = re.compile(rb'\* \d+ FETCH \(UID (\d+) FLAGS \(([^()]*)\) INTERNALDATE "([^"]*)" '
                         rb"BODY\[\] \{\d+\+?\}\r\n$")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]", re.IGNORECASE)
_LIST_CHUNK = 500  # UIDs per FETCH command: keeps command lines short
DIGEST_OVER = 1 << 20  # a read-back body larger than this is hashed as it streams in
# What `folders` sends to a server with SPECIAL-USE and LIST-STATUS (Dovecot, Cyrus, ...)
_LIST_ALL = 'LIST "" "*" RETURN (SPECIAL-USE STATUS (UIDVALIDITY UIDNEXT MESSAGES))'


def wire_form(data: bytes) -> bytes:
    """The message as IMAP serves it: every line ending CRLF."""
    if not has_bare_lf(data):
        return data
    return _BARE_LF.sub(b"\r\n", data)


def content_hash(data: bytes) -> str:
    """The content identity of a message: sha256 of its wire form."""
    return hashlib.sha256(wire_form(data)).hexdigest()


@dataclass
class Outgoing:
    """A message to append."""

    data: bytes
    flags: tuple[str, ...]
    date: str | None


@dataclass
class AppendResult:
    """What an append batch gave: the validity and, per message, a UID or an error."""

    validity: str | None
    uids: list[str | None]
    errors: list[str | None]


class Endpoint(Protocol):
    """A mailbox on some system, seen by the mover."""

    label: str

    async def open(self) -> None:
        """Connect (idempotent)."""

    async def close(self) -> None:
        """Disconnect."""

    async def folders(self) -> list[Folder]:
        """Every folder (canonical names)."""

    async def create_folder(self, name: str) -> None:
        """Create a folder if missing."""

    async def listing(self, name: str, *, full: bool = True) -> Listing | None:
        """The folder's messages, or None when the folder does not exist; `full=False`
        may leave out Message-ID, flags and date (a target's listing needs UID and size)."""

    async def fetch(self, name: str, uids: Sequence[str], sink: Sink, *,
                    meta: bool = False) -> None:
        """Stream these messages into `sink` (uid, data, flags, date); with `meta=False`
        the flags and date may be left out (None)."""

    async def append(self, name: str, messages: Sequence[Outgoing]) -> AppendResult:
        """Append messages in order."""

    async def read_back(self, name: str, uids: Sequence[str], sink: Sink, *,
                        raw: bool = False) -> None:
        """Stream what the target stored under these UIDs, as it serves it now (the proof
        of a copy); a large body may arrive as a `Digest` (hashed while it streamed;
        with `raw` the hash may be of the bytes as served, not of their wire form)."""


class StreamingTarget(Protocol):
    """A target that takes a message whose bytes stream in (`ImapEndpoint`: an APPEND's
    literal; `DovecotDirectEndpoint`: a file). The handle is the target's own."""

    async def append_stream(self, name: str, flags: tuple[str, ...], date: str | None,
                            size: int, chunks: AsyncIterator[bytes]) -> object:
        """Start the append, writing the message as `chunks` yields it."""

    async def append_finish(self, pending: object, *, wire_size: int | None = None
                            ) -> AppendResult:
        """Its answer. `wire_size`: the message's length in wire form (CRLF), which the
        pipeline knows from hashing it (a Maildir file's name carries it)."""


__all__ = ["Digest"]  # re-exported: the pipeline tells hashed-in-flight bodies apart


# -- dates and flags ----------------------------------------------------------------------
def header_message_id(data: bytes) -> str:
    """The Message-ID of a whole message or a fetched header section ('' when none)."""
    return message_id_of(data) or ""


def uid_set(uids: Sequence[str]) -> str:
    """Compress UIDs into an IMAP sequence set: 1:5,8,10:12."""
    numbers = sorted(int(u) for u in uids)
    parts: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:]:
        if n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}:{prev}" if prev > start else str(start))
        start = prev = n
    parts.append(f"{start}:{prev}" if prev > start else str(start))
    return ",".join(parts)


def _asked(uids: Sequence[str]) -> Callable[[Untagged], bool]:
    """Whether a FETCH response carries the body of one of these UIDs. Why: one connection
    may have several fetches in flight (a target's read-backs of consecutive APPENDs, a
    second read in wire form, a Maildir file's UID lookup by X-GUID); a response handed to
    the first FETCH in flight, whatever it asked for, was dropped there and its own FETCH
    never saw it: the read-back of that copy "never came back", so an altered big copy was
    reported missing instead of altered (tests/test_mover_stream.py, about one run in three
    under load). A response without a body (an X-GUID lookup's, a flag change another
    session made) is not a body fetch's either."""
    wanted = frozenset(int(u) for u in uids)

    def accepts(response: Untagged) -> bool:
        items = response[2] if len(response) > 2 else None
        if isinstance(items, list) and items[:1] == [b"UID"] and len(items) > 1:
            # the fast path's shape: UID first
            return as_int(items[1]) in wanted and b"BODY[]" in items
        found = fetch_items(response)
        return found is not None and as_int(found.get(b"UID")) in wanted \
            and b"BODY[]" in found
    return accepts


def expand_uid_set(text: str) -> list[str]:
    """An APPENDUID set (5:7,9) -> ['5','6','7','9'] (bounded by the batch size)."""
    result: list[str] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        a, b = int(low), int(high or low)
        if a > b:
            a, b = b, a
        if b - a > 100_000:
            raise ValueError(f"implausible APPENDUID range {part}")
        result.extend(str(n) for n in range(a, b + 1))
    return result


# -- IMAP ---------------------------------------------------------------------------------
class ImapEndpoint:
    """A mailbox on an IMAP server, over one pipelined connection."""

    client_type: type[ImapClient] = ImapClient  # tests give servers other capabilities
    streams = True  # `fetch` can hand a big body over chunk by chunk (`BodyStreamer`)

    def __init__(self, account: ImapAccount, *, readonly: bool = False,
                 pool: ConnectionPool | None = None, pace: SystemPace | None = None) -> None:
        self.account = account
        self.readonly = readonly
        self.pool = pool
        # The system's limits and back-off (`pace.py`): a connection slot is held from
        # `open` to `close`; no pooled connection while a connection limit is in force.
        self.pace = pace
        self._slot = False
        who = account.authorize_as or account.user
        self.owner = who
        self.label = f"imap://{who}@{account.host}:{account.port}"
        self.client: ImapClient | None = None
        self.separator: str | None = "/"
        self.prefix = ""
        # Other users' and shared namespaces (NAMESPACE, RFC 2342): not this mailbox's mail.
        # Cyrus lists another user's folder shared by ACL as user.NAME.FOLDER in the same
        # LIST; copying it would put someone else's mail into BOX2.
        self.foreign: tuple[str, ...] = ()
        self._selected: str | None = None
        self._validity = ""
        self._state = ""
        # canonical folder -> "UIDVALIDITY/UIDNEXT/MESSAGES" from LIST-STATUS (RFC 5819)
        self.folder_status: dict[str, str] = {}
        self._early_list: list[Untagged] | None = None  # the LIST sent behind the login
        # Gmail (X-GM-EXT-1) as a source: its labels as folders, each message once
        self.gmail: GmailLabels | None = None

    async def open(self) -> None:
        """Connect, log in, learn separator and personal namespace prefix."""
        if self.client is not None:
            return
        if self.pace is not None and not self._slot:
            await self.pace.connect(self.owner)
            self._slot = True
        try:
            await self._open()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._slot and self.pace is not None:
            self._slot = False
            self.pace.disconnect(self.owner)

    def _pooled(self) -> ConnectionPool | None:
        return self.pool if self.pace is None or self.pace.pooling else None

    @property
    def server(self) -> tuple[str, int]:
        """(host, port): what an `ImapThrottled` names."""
        return (self.account.host, self.account.port)

    async def _open(self) -> None:
        a = self.account
        pool = self._pooled()
        idle = pool.take(a) if pool is not None else None
        if idle is not None:
            self.client, self.separator, self.prefix = idle.client, idle.separator, idle.prefix
            self.foreign = idle.foreign
            self._selected = None
            return
        try:
            client = await self.client_type.connect(a.host, a.port, timeout=a.timeout, tls=a.tls,
                                              cafile=a.cafile)
        except ImapError as exc:
            if not a.system:
                raise
            raise type(exc)(f"{a.system}: {exc}") from exc
        early: list[Pending] | None = None
        try:
            started: list[Pending] | None = None
            if a.oauth is None:
                # The login alone (RFC 3501 5.5: nothing behind a state-changing command until
                # it completes; Cyrus answers BAD to what follows AUTHENTICATE and loses
                # the command after that), then NAMESPACE and the folder LIST in one write.
                started = await client.start_login(
                    a.user, a.password, authorize_as=a.authorize_as,
                    then=[(b"NAMESPACE", "NAMESPACE"), (_LIST_ALL.encode(), "LIST")])
            early = started[1:] if started is not None else None  # NAMESPACE, LIST
            try:
                if a.oauth is not None:  # a bearer token; NAMESPACE and LIST asked below
                    await oauth2.imap_login(client, a.user, a.oauth)
                elif started is None:
                    await client.login(a.user, a.password, authorize_as=a.authorize_as)
                else:
                    await client.finish_login(started[0])
            except oauth2.OAuth2Error as exc:
                # No token: a refused grant needs an admin (no retry), an endpoint that did
                # not answer is retried like a broken connection.
                kind = ImapLoginError if exc.permanent else ImapConnectionError
                raise kind(f"{a.where}: login as {a.user!r}: no OAuth2 token: {exc}") from None
            except ImapCommandError as exc:
                # (a busy server's `NO [UNAVAILABLE]` or "too many connections" came as
                # `ImapThrottled`, retried: this is a refusal of the credentials)
                who = (f"master user {a.user!r} for {a.authorize_as!r}" if a.authorize_as
                       else repr(a.user))
                how = f" with an OAuth2 token ({a.oauth.mechanism.upper()})" if a.oauth else ""
                raise ImapLoginError(f"{a.where}: login as {who}{how} refused (bad "
                                     f"credentials?): {exc.status} {exc.text}") from exc
            namespace = None
            if early is not None:
                with contextlib.suppress(ImapCommandError):  # no NAMESPACE: asked below
                    namespace = await client.finish(early[0])
                with contextlib.suppress(ImapCommandError):  # no RETURN options: later
                    listed = await client.finish(early[1])
                    if {"SPECIAL-USE", "LIST-STATUS"} <= client.capabilities:
                        self._early_list = listed
            if namespace is None and "NAMESPACE" in client.capabilities:
                namespace = await client.simple("NAMESPACE")
            if namespace is not None:
                for resp in namespace:
                    personal = resp[1] if len(resp) > 1 and resp[0] == b"NAMESPACE" else None
                    if isinstance(personal, list) and personal and isinstance(personal[0], list):
                        prefix, sep = (personal[0] + [None, None])[:2]
                        self.prefix = mutf7.decode(prefix.decode()) \
                            if isinstance(prefix, bytes) else ""
                        self.separator = sep.decode() if isinstance(sep, bytes) else None
                    if personal is not None:
                        self.foreign = _foreign_prefixes(resp[2:4])
            else:
                for resp in await client.simple('LIST "" ""'):
                    if len(resp) > 2 and resp[0] == b"LIST":
                        sep = resp[2]
                        self.separator = sep.decode() if isinstance(sep, bytes) else None
        except BaseException:
            for pending in early or ():
                client.abandon(pending)
            client.close()
            raise
        self.client = client
        self._selected = None

    async def close(self) -> None:
        """Log out, or hand the connection to the pool with no folder selected."""
        if self.client is None:
            self._release()
            return
        try:
            await self._close()
        finally:
            self._release()

    async def _close(self) -> None:
        assert self.client is not None
        client, self.client = self.client, None
        selected, self._selected = self._selected, None
        pool = self._pooled()
        # Only a connection with nothing in flight (a pass that failed half-way may have left
        # a FETCH running) goes back to the pool.
        if pool is not None and client.quiet:
            try:
                if selected is not None:
                    # UNSELECT (RFC 3691); else CLOSE, which expunges nothing in a folder
                    # opened with EXAMINE, the only way this endpoint opens folders.
                    await client.simple("UNSELECT" if "UNSELECT" in client.capabilities
                                        else "CLOSE")
            except ImapError:
                client.close()
                return
            await pool.give(self.account, Idle(client, self.separator, self.prefix,
                                               foreign=self.foreign))
            return
        await client.logout()

    def _c(self) -> ImapClient:
        if self.client is None:
            raise RuntimeError(f"{self.label}: not open")
        return self.client

    def client_for_labels(self) -> ImapClient:
        """The logged-in connection (`gmail.py` lists All Mail's labels on it)."""
        return self._c()

    async def select(self, name: str) -> bool:
        """EXAMINE a folder (canonical name); False when it does not exist."""
        return await self._select(name)

    @property
    def validity(self) -> str:
        """The UIDVALIDITY of the folder selected last."""
        return self._validity

    def _native(self, name: str) -> str:
        return native(name, self.separator, self.prefix)

    async def folders(self) -> list[Folder]:
        """LIST (with RETURN (SPECIAL-USE) when offered), names decoded and canonical; on a
        Gmail source (X-GM-EXT-1) its labels as folders (`gmail.py`)."""
        listed = await self._folders()
        if self.readonly and "X-GM-EXT-1" in self._c().capabilities:
            self.gmail = self.gmail or GmailLabels(self)
            return await self.gmail.folders(listed)
        return listed

    async def _folders(self) -> list[Folder]:
        client = self._c()
        command = 'LIST "" "*"'
        returns = []
        if "SPECIAL-USE" in client.capabilities:
            returns.append("SPECIAL-USE")
        if "LIST-STATUS" in client.capabilities:
            returns.append("STATUS (UIDVALIDITY UIDNEXT MESSAGES)")
        if returns:
            command += f" RETURN ({' '.join(returns)})"
        result: list[Folder] = []
        self.folder_status = {}
        # The LIST sent with the login answers the first call (same command, same moment
        # of this pass: its states are server facts like any other LIST's).
        early, self._early_list = self._early_list, None
        responses = early if early is not None else await client.simple(command)
        self._statuses(responses)
        for resp in responses:
            if len(resp) < 4 or resp[0] != b"LIST" or not isinstance(resp[1], list):
                continue
            attrs = [a.decode() for a in resp[1] if isinstance(a, bytes)]
            raw = resp[3]
            if not isinstance(raw, bytes):
                continue
            sep = resp[2].decode() if isinstance(resp[2], bytes) else None
            decoded = mutf7.decode(raw.decode("utf-8", "replace"))
            if any(decoded.startswith(p) for p in self.foreign):
                continue  # another user's or a shared folder
            name = canonical(decoded, sep, self.prefix)
            use = next((ATTRIBUTES[a.lower()] for a in attrs if a.lower() in ATTRIBUTES), None)
            lowered = {a.lower() for a in attrs}
            if use is None and "SPECIAL-USE" not in client.capabilities:
                use = guess_special_use(name)
            result.append(Folder(name, decoded, use,
                                 "\\noselect" not in lowered and "\\nonexistent" not in lowered))
        if "LIST-STATUS" not in client.capabilities:
            await self._status_each(result)
        return result

    def _statuses(self, responses: list[Untagged]) -> None:
        """Keep "UIDVALIDITY/UIDNEXT/MESSAGES" of each untagged STATUS response."""
        for resp in responses:
            if len(resp) >= 3 and resp[0] == b"STATUS" and isinstance(resp[1], bytes) \
                    and isinstance(resp[2], list):
                values = dict(zip(resp[2][::2], resp[2][1::2], strict=False))
                name = canonical(mutf7.decode(resp[1].decode("utf-8", "replace")),
                                 self.separator, self.prefix)
                v, n, m = (values.get(k) for k in (b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES"))
                # UIDVALIDITY 0 is no validity (Dovecot's LIST-STATUS says so for a folder
                # never opened): no state, no shortcut.
                if isinstance(v, bytes) and isinstance(n, bytes) and isinstance(m, bytes) \
                        and v.strip(b"0"):
                    self.folder_status[name] = f"{v.decode()}/{n.decode()}/{m.decode()}"

    async def _status_each(self, folders: list[Folder]) -> None:
        """Without LIST-STATUS: one STATUS per folder, all in flight at once (one round
        trip, not one per folder). Never for the selected folder: RFC 3501 6.3.10 does not
        promise a current answer there, and a stale one could wrongly say "unchanged"."""
        client = self._c()
        started = []
        for folder in folders:
            if folder.selectable and folder.name != self._selected:
                box = quote_mailbox(self._native(folder.name)).decode()
                started.append(await client.start(
                    [f"STATUS {box} (UIDVALIDITY UIDNEXT MESSAGES)".encode()], "STATUS"))
        for pending in started:
            # a folder gone since LIST gets no state, so no shortcut
            with contextlib.suppress(ImapCommandError):
                self._statuses(await client.finish(pending))

    async def create_folder(self, name: str) -> None:
        """CREATE, ignoring 'already exists'."""
        try:
            await self._c().simple(f"CREATE {quote_mailbox(self._native(name)).decode()}")
        except ImapCommandError:
            if name not in {f.name for f in await self.folders()}:
                raise

    async def _select(self, name: str) -> bool:
        """EXAMINE the folder unless selected; False when it does not exist."""
        if self._selected == name:
            return True
        validity = ""
        try:
            responses = await self._c().simple(
                f"EXAMINE {quote_mailbox(self._native(name)).decode()}")
        except ImapCommandError:
            self._selected = None
            return False
        uidnext = exists = ""
        for resp in responses:
            if len(resp) > 1 and resp[0] == b"OK" and isinstance(resp[1], bytes):
                match = _UIDVALIDITY.match(resp[1])
                validity = match.group(1).decode() if match else validity
                match = _UIDNEXT.match(resp[1])
                uidnext = match.group(1).decode() if match else uidnext
            elif len(resp) > 1 and resp[1] == b"EXISTS" and isinstance(resp[0], bytes):
                exists = resp[0].decode()
        self._selected = name
        self._validity = validity
        self._state = f"{validity}/{uidnext}/{exists}" if validity and uidnext and exists else ""
        return True

    async def listing(self, name: str, *, full: bool = True) -> Listing | None:
        """UID, size, flags, INTERNALDATE and Message-ID of every message (no bodies); only
        UID and size with `full=False` (cheap on a server that has not cached headers)."""
        if self.gmail is not None and self.gmail.owns(name):
            return self.gmail.listing(name)
        self._selected = None  # re-EXAMINE: see what was appended since
        if not await self._select(name):
            return None
        listing = Listing(self._validity, state=self._state)

        def collect(resp: Untagged) -> None:
            items = fetch_items(resp)
            if items is None or b"UID" not in items:
                return
            flags = items.get(b"FLAGS")
            header = items.get(b"BODY[HEADER.FIELDS (MESSAGE-ID)]")
            date = items.get(b"INTERNALDATE")
            listing.entries.append(Entry(
                uid=str(as_int(items[b"UID"])), size=as_int(items.get(b"RFC822.SIZE")),
                message_id=header_message_id(header) if isinstance(header, bytes) else "",
                flags=tuple(f.decode() for f in flags if isinstance(f, bytes)
                            and f.lower() != b"\\recent") if isinstance(flags, list) else (),
                date=date.decode() if isinstance(date, bytes) else None,
            ))

        items = ("UID RFC822.SIZE FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
                 if full else "UID RFC822.SIZE")
        await self._c().simple(f"UID FETCH 1:* ({items})", handler=collect)
        return listing

    async def fetch(self, name: str, uids: Sequence[str], sink: Sink, *,
                    meta: bool = False, digest: bool = False, raw: bool = False,
                    stream: BodyStreamer | None = None) -> None:
        """Pipelined UID FETCH BODY.PEEK[] (with FLAGS and INTERNALDATE when `meta`); the
        sink's back-pressure stops the reading. `digest`: bodies over `DIGEST_OVER` bytes
        reach the sink as a `Digest` (only their hash is wanted; `raw`: the hash of the
        bytes as served, see `Digest.raw`). `stream` (with `meta`)
        may take a body as it arrives, chunk by chunk (see `BodyStreamer`); the sink then
        gets its `Digest`."""
        if not uids:
            return
        if self.gmail is not None and self.gmail.owns(name):
            name = self.gmail.source_of(name, uids)  # a label folder's UIDs are All Mail's
        if not await self._select(name):
            raise ImapCommandError("EXAMINE", "NO", f"folder {name} vanished")

        async def deliver(resp: Untagged) -> None:
            items = fetch_items(resp)
            if items is None:
                return
            body = items.get(b"BODY[]")
            if isinstance(body, bytes):
                flags = items.get(b"FLAGS")
                date = items.get(b"INTERNALDATE")
                await sink(str(as_int(items.get(b"UID"))), body,
                           tuple(f.decode() for f in flags if isinstance(f, bytes)
                                 and f.lower() != b"\\recent")
                           if isinstance(flags, list) else None,
                           date.decode() if isinstance(date, bytes) else None)

        def streamer(line: bytes, size: int) -> Callable[[Literal], Awaitable[bytes]] | None:
            ahead = _BODY_AHEAD.match(line)
            if ahead is None or stream is None:
                return None
            flags = tuple(f.decode() for f in ahead.group(2).split()
                          if f.lower() != b"\\recent")
            return stream(ahead.group(1).decode(), flags, ahead.group(3).decode(), size)

        client = self._c()
        what = "UID FLAGS INTERNALDATE BODY.PEEK[]" if meta else "UID BODY.PEEK[]"
        ordered = sorted(uids, key=int)
        started = [
            await client.start(
                [f"UID FETCH {uid_set(ordered[i:i + _LIST_CHUNK])} ({what})".encode()],
                "UID FETCH", handler=deliver, accepts=_asked(ordered[i:i + _LIST_CHUNK]),
                digest_over=DIGEST_OVER if digest else None, digest_raw=raw,
                streamer=streamer if stream is not None and meta else None)
            for i in range(0, len(ordered), _LIST_CHUNK)
        ]
        for n, pending in enumerate(started):
            try:
                await client.finish(pending)
            except BaseException:
                for later in started[n + 1:]:
                    client.abandon(later)  # failed with the connection: nobody reads them
                raise

    async def append(self, name: str, messages: Sequence[Outgoing]) -> AppendResult:
        """MULTIAPPEND when offered (one transaction on the server), else one APPEND each;
        a refused batch is retried message by message to tell which one failed."""
        client = self._c()
        box = quote_mailbox(self._native(name))
        if len(messages) > 1 and "MULTIAPPEND" in client.capabilities:
            segments: list[bytes] = [b"APPEND " + box]
            for msg in messages:
                segments[-1] += b" " + _flags_and_date(msg)
                segments.append(msg.data)
                segments.append(b"")
            try:
                pending = await client.start(segments, "APPEND")
                return _append_result(await client.finish(pending), pending_text(pending),
                                      len(messages))
            except ImapCommandError:
                pass  # fall through: find the culprit one by one
        results = await asyncio.gather(*(self._append_one(box, m) for m in messages))
        validity = next((r.validity for r in results if r.validity), None)
        return AppendResult(validity, [r.uids[0] for r in results],
                            [r.errors[0] for r in results])

    async def read_back(self, name: str, uids: Sequence[str], sink: Sink, *,
                        raw: bool = False) -> None:
        """NOOP, then UID FETCH BODY.PEEK[] of the UIDs an APPEND gave, pipelined behind it.

        Why the NOOP: the folder is selected (EXAMINE) while appends to it complete; a
        server updates a selected folder's view of new messages at a command that may send
        EXISTS, and RFC 3501 lets FETCH skip that. A body larger than `DIGEST_OVER` comes as
        a `Digest` (hashed in flight): a read-back never holds a second copy of a big
        message."""
        if not uids:
            return
        if not await self._select(name):
            raise ImapCommandError("EXAMINE", "NO", f"folder {name} vanished")
        client = self._c()
        noop = await client.start([b"NOOP"], "NOOP")
        try:
            await self.fetch(name, uids, sink, digest=True, raw=raw)
        except BaseException:
            client.abandon(noop)  # the connection goes with the error: nobody reads it
            raise
        await client.finish(noop)

    async def copy_within(self, from_name: str, uids: Sequence[str],
                          to_name: str) -> AppendResult:
        """`UID COPY` messages of one folder of this mailbox into another, on the server
        (a message that must be in two target folders is sent once, `gmail.py`); the new
        UIDs when the server says them (COPYUID, RFC 4315)."""
        if not await self._select(from_name):
            raise ImapCommandError("EXAMINE", "NO", f"folder {from_name} vanished")
        ordered = sorted(uids, key=int)
        pending = await self._c().start(
            [f"UID COPY {uid_set(ordered)} {quote_mailbox(self._native(to_name)).decode()}"
             .encode()], "UID COPY")
        await self._c().finish(pending)
        match = _COPYUID.search(pending_text(pending))
        if not match:
            return AppendResult(None, [None] * len(ordered), [None] * len(ordered))
        given = dict(zip(expand_uid_set(match.group(2)), expand_uid_set(match.group(3)),
                         strict=False))
        return AppendResult(match.group(1), [given.get(u) for u in ordered],
                            [None] * len(ordered))

    async def append_stream(self, name: str, flags: tuple[str, ...], date: str | None,
                            size: int, chunks: AsyncIterator[bytes]) -> object:
        """Start an APPEND whose literal (`size` bytes) is written as `chunks` yields it
        (a source's FETCH literal arriving); `append_finish` waits for its answer."""
        box = quote_mailbox(self._native(name))
        return await self._c().start(
            [b"APPEND " + box + b" " + _flags_and_date(Outgoing(b"", flags, date)),
             LiteralOut(size, chunks), b""], "APPEND")

    async def append_finish(self, pending: object, *, wire_size: int | None = None
                            ) -> AppendResult:
        """The answer of an `append_stream`: its UID, or the server's refusal."""
        if not isinstance(pending, Pending):
            raise TypeError(f"not an APPEND of this endpoint: {pending!r}")
        try:
            await self._c().finish(pending)
        except ImapCommandError as exc:
            return AppendResult(None, [None], [exc.text or exc.status])
        return _append_result([], pending_text(pending), 1)

    async def _append_one(self, box: bytes, msg: Outgoing) -> AppendResult:
        client = self._c()
        try:
            pending = await client.start([b"APPEND " + box + b" " + _flags_and_date(msg),
                                          msg.data, b""], "APPEND")
            await client.finish(pending)
        except ImapCommandError as exc:
            return AppendResult(None, [None], [exc.text or exc.status])
        return _append_result([], pending_text(pending), 1)


_COPYUID = re.compile(r"\[COPYUID (\d+) ([0-9:,]+) ([0-9:,]+)\]", re.IGNORECASE)
_APPENDUID = re.compile(r"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)


def _append_result(_untagged: list[Untagged], text: str, count: int) -> AppendResult:
    match = _APPENDUID.search(text)
    if not match:
        return AppendResult(None, [None] * count, [None] * count)
    uids: list[str | None] = list(expand_uid_set(match.group(2)))
    if len(uids) != count:
        uids = [None] * count  # a server that numbers oddly: verify by content instead
    return AppendResult(match.group(1), uids, [None] * count)


def _foreign_prefixes(groups: Sequence[object]) -> tuple[str, ...]:
    """The non-empty prefixes of NAMESPACE's other-users and shared groups (an empty
    prefix, Cyrus's shared namespace, would match every name and is left out)."""
    prefixes: list[str] = []
    for group in groups:
        if not isinstance(group, list):
            continue
        for entry in group:
            if isinstance(entry, list) and entry and isinstance(entry[0], bytes) and entry[0]:
                prefixes.append(mutf7.decode(entry[0].decode()))
    return tuple(prefixes)


def _flags_and_date(msg: Outgoing) -> bytes:
    flags = " ".join(f for f in msg.flags if f.lower() != "\\recent")
    text = f"({flags})"
    if msg.date:
        text += f' "{msg.date}"'
    return text.encode() + b" "


# -- drivers ------------------------------------------------------------------------------
DRIVER_VALIDITY = "key"  # a driver's message keys never change meaning


class DriverEndpoint:
    """A mailbox of any `MailSystemDriver` (the embedded maildir system first), through the
    driver's blocking calls run in worker threads."""

    def __init__(self, driver: MailSystemDriver, mailbox_id: str, *,
                 pace: SystemPace | None = None) -> None:
        self.driver = driver
        self.mailbox_id = mailbox_id
        self.pace = pace  # its daily budget and rate (no connections to count)
        self.label = f"{driver.name}:{mailbox_id}"

    async def open(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to close."""

    async def folders(self) -> list[Folder]:
        """The driver's folders (already canonical), special use guessed from the name."""
        names = await asyncio.to_thread(self.driver.list_folders, self.mailbox_id)
        return [Folder(n, n, guess_special_use(n)) for n in names]

    async def create_folder(self, name: str) -> None:
        """Create the folder when the driver can (the maildir driver can)."""
        create = getattr(self.driver, "create_folder", None)
        if callable(create):
            await asyncio.to_thread(create, self.mailbox_id, name)

    async def listing(self, name: str, *, full: bool = True) -> Listing | None:
        """The driver's listing, each message hashed in wire form."""
        def read() -> Listing | None:
            if name not in self.driver.list_folders(self.mailbox_id):
                return None
            listing = Listing(DRIVER_VALIDITY)
            for msg in self.driver.list_messages(self.mailbox_id, name):
                data = wire_form(self.driver.read_message(self.mailbox_id, name, msg.key))
                listing.entries.append(Entry(
                    msg.key, len(data), msg.message_id or "", maildir_flags.to_imap(msg.flags),
                    imap_date(msg.internal_date), hashlib.sha256(data).hexdigest()))
            return listing
        return await asyncio.to_thread(read)

    async def fetch(self, name: str, uids: Sequence[str], sink: Sink, *,
                    meta: bool = False) -> None:
        """Read each message in turn (one in memory at a time)."""
        for uid in uids:
            data = await asyncio.to_thread(self.driver.read_message, self.mailbox_id, name, uid)
            await sink(uid, data, None, None)  # flags and date came with the listing

    async def read_back(self, name: str, uids: Sequence[str], sink: Sink, *,
                        raw: bool = False) -> None:
        """What the driver stored, read from it again; a key it cannot read (an append
        it acknowledged without storing) is left out: that copy is not proven."""
        for uid in uids:
            try:
                data = await asyncio.to_thread(self.driver.read_message, self.mailbox_id,
                                               name, uid)
            except Exception:  # see the docstring: unproven, not an error
                continue
            await sink(uid, data, None, None)

    async def append(self, name: str, messages: Sequence[Outgoing]) -> AppendResult:
        """Store each message byte for byte with its flags and date."""
        uids: list[str | None] = []
        errors: list[str | None] = []
        for msg in messages:
            try:
                key = await asyncio.to_thread(
                    self.driver.append_message, self.mailbox_id, name, msg.data,
                    flags=maildir_flags.to_maildir(msg.flags), internal_date=epoch_of(msg.date))
                uids.append(key)
                errors.append(None)
            except Exception as exc:
                uids.append(None)
                errors.append(str(exc))
        return AppendResult(DRIVER_VALIDITY, uids, errors)
