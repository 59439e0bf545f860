"""A small real IMAP server that behaves like Gmail's, for the mover's Gmail path: a TCP
server on 127.0.0.1 speaking enough IMAP4rev1 for a read-only client (LOGIN, CAPABILITY,
NAMESPACE, LIST with SPECIAL-USE, STATUS, EXAMINE, UID FETCH, NOOP, UNSELECT, CLOSE,
LOGOUT) and announcing Gmail's `X-GM-EXT-1` (`X-GM-LABELS`, `X-GM-MSGID`).

Why a server of our own: Gmail cannot run here, and what matters is its model, which no
other server has: a message is stored once and *labelled*; every label is a folder
(`INBOX`, `Work`, `[Gmail]/Sent Mail`, `[Gmail]/Starred`, ...) that shows the same
message under its own UID, and `[Gmail]/All Mail` (`\\All`) shows every message but those
in `[Gmail]/Spam` and `[Gmail]/Trash`. A client that copies folder by folder downloads a
message once per label (imapsync's `--gmail1` warns about it; Gmail counts every byte
against the 2.5 GB a day). The server counts the bodies it served per message (`served`),
so a test can prove each message left it once.

It runs its own event loop in a thread; `close()` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field

from helpers.loop_server import LoopServer

ALL, SPAM, TRASH = "[Gmail]/All Mail", "[Gmail]/Spam", "[Gmail]/Trash"
# Gmail's system folders: name, attribute, the label (X-GM-LABELS) that puts a message in it
SYSTEM = {
    "INBOX": ("", "\\Inbox"),
    ALL: ("\\All", None),
    "[Gmail]/Sent Mail": ("\\Sent", "\\Sent"),
    "[Gmail]/Drafts": ("\\Drafts", "\\Draft"),
    "[Gmail]/Starred": ("\\Flagged", "\\Starred"),
    "[Gmail]/Important": ("\\Important", "\\Important"),
    SPAM: ("\\Junk", None),
    TRASH: ("\\Trash", None),
}
CAPS = b"IMAP4rev1 X-GM-EXT-1 UIDPLUS SPECIAL-USE NAMESPACE UNSELECT ID"


@dataclass
class Message:
    body: bytes
    labels: set[str]  # "\\Inbox", "\\Sent", "Work", ... (X-GM-LABELS' values)
    where: str = ALL  # ALL, SPAM or TRASH: where Gmail keeps it
    flags: tuple[str, ...] = ()
    date: str = "01-Jan-2024 10:00:00 +0000"
    msgid: int = 0


@dataclass
class Mailbox:
    password: str
    messages: list[Message] = field(default_factory=list)

    def folders(self) -> list[str]:
        user = sorted({label for m in self.messages for label in m.labels
                       if not label.startswith("\\")})
        parents = sorted({"/".join(u.split("/")[:i]) for u in user
                          for i in range(1, u.count("/") + 1)} - set(user))
        return [*SYSTEM, *parents, *user]

    def view(self, folder: str) -> list[Message]:
        """The messages a folder shows, in UID order (UID = position + 1)."""
        if folder in (SPAM, TRASH):
            return [m for m in self.messages if m.where == folder]
        kept = [m for m in self.messages if m.where == ALL]
        if folder == ALL:
            return kept
        label = SYSTEM[folder][1] if folder in SYSTEM else folder
        return [m for m in kept if label in m.labels]


def _seq(text: str, top: int) -> list[int]:
    result: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        a = top if low == "*" else int(low)
        b = a if not high else top if high == "*" else int(high)
        result.extend(range(min(a, b), max(a, b) + 1))
    return [n for n in result if 1 <= n <= top]


def _quote(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


_ARGS = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


class GmailServer:
    """See the module's docstring; `users` maps a login to its `Mailbox`."""

    def __init__(self, users: dict[str, Mailbox]) -> None:
        self.users = users
        for box in users.values():
            for n, m in enumerate(box.messages, 1):
                m.msgid = m.msgid or 1_700_000_000_000 + n
        self.served: Counter[int] = Counter()  # X-GM-MSGID -> bodies served
        self.commands: list[str] = []
        self._listener = LoopServer(self._session, "gmail server")
        self.port = self._listener.port

    def close(self) -> None:
        self._listener.close()

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        box: Mailbox | None = None
        selected: str | None = None

        def out(*lines: bytes) -> None:
            for line in lines:
                writer.write(line + b"\r\n")

        out(b"* OK [CAPABILITY " + CAPS + b"] Gimap ready")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            while True:
                line = (await reader.readuntil(b"\r\n"))[:-2].decode()
                tag, _, rest = line.partition(" ")
                verb, _, args = rest.partition(" ")
                verb = verb.upper()
                if verb == "UID":
                    sub, _, args = args.partition(" ")
                    verb = "UID " + sub.upper()
                self.commands.append(verb)
                words = [a or b for a, b in _ARGS.findall(args)]
                ok = f"{tag} OK {verb} done".encode()
                if verb == "CAPABILITY":
                    out(b"* CAPABILITY " + CAPS, ok)
                elif verb == "LOGIN":
                    user, password = [*words, "", ""][:2]
                    if user in self.users and self.users[user].password == password:
                        box = self.users[user]
                        out(f"{tag} OK [CAPABILITY ".encode() + CAPS + b"] authenticated")
                    else:
                        out(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials".encode())
                elif verb == "LOGOUT":
                    out(b"* BYE LOGOUT Requested", ok)
                    await writer.drain()
                    break
                elif verb == "NOOP":
                    out(ok)
                elif box is None:
                    out(f"{tag} BAD not authenticated".encode())
                elif verb == "NAMESPACE":
                    out(b'* NAMESPACE (("" "/")) NIL NIL', ok)
                elif verb == "LIST":
                    for name in box.folders():
                        attrs = ["\\HasNoChildren"]
                        if name in SYSTEM and SYSTEM[name][0]:
                            attrs.append(SYSTEM[name][0])
                        if name == "[Gmail]":
                            attrs = ["\\Noselect", "\\HasChildren"]
                        out(f"* LIST ({' '.join(attrs)}) \"/\" ".encode() + _quote(name))
                    out(b'* LIST (\\Noselect \\HasChildren) "/" "[Gmail]"', ok)
                elif verb == "STATUS":
                    name = words[0]
                    view = box.view(name)
                    out(b"* STATUS " + _quote(name) + f" (UIDVALIDITY 7 UIDNEXT "
                        f"{len(view) + 1} MESSAGES {len(view)})".encode(), ok)
                elif verb in ("EXAMINE", "SELECT"):
                    name = words[0]
                    if name not in box.folders() or name == "[Gmail]":
                        out(f"{tag} NO [NONEXISTENT] Unknown Mailbox".encode())
                        continue
                    selected = name
                    view = box.view(name)
                    out(f"* {len(view)} EXISTS".encode(), b"* 0 RECENT",
                        b"* OK [UIDVALIDITY 7] UIDs valid",
                        f"* OK [UIDNEXT {len(view) + 1}] next".encode(),
                        f"{tag} OK [READ-ONLY] {verb} done".encode())
                elif verb in ("UNSELECT", "CLOSE"):
                    selected = None
                    out(ok)
                elif verb == "UID FETCH" and selected is not None:
                    view = box.view(selected)
                    uids = _seq(words[0], len(view))
                    items = args.split(" ", 1)[1].upper()
                    for uid in uids:
                        writer.write(self._fetch(view[uid - 1], uid, items))
                        await writer.drain()
                    out(ok)
                else:
                    out(f"{tag} BAD {verb} not supported here".encode())
                await writer.drain()
        writer.close()

    def _fetch(self, m: Message, uid: int, items: str) -> bytes:
        parts = [f"UID {uid}"]
        if "RFC822.SIZE" in items:
            parts.append(f"RFC822.SIZE {len(m.body)}")
        if "X-GM-MSGID" in items:
            parts.append(f"X-GM-MSGID {m.msgid}")
        if "X-GM-LABELS" in items:
            labels = " ".join(label if label.startswith("\\") else _quote(label).decode()
                              for label in sorted(m.labels))
            parts.append(f"X-GM-LABELS ({labels})")
        if "FLAGS" in items:
            flags = set(m.flags) | ({"\\Flagged"} if "\\Starred" in m.labels else set())
            parts.append(f"FLAGS ({' '.join(sorted(flags))})")
        if "INTERNALDATE" in items:
            parts.append(f'INTERNALDATE "{m.date}"')
        head = f"* {uid} FETCH ({' '.join(parts)}".encode()
        if "BODY.PEEK[]" in items or "BODY[]" in items:
            self.served[m.msgid] += 1
            return head + f" BODY[] {{{len(m.body)}}}\r\n".encode() + m.body + b")\r\n"
        return head + b")\r\n"
