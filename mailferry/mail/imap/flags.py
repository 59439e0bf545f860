"""Maildir flag letters <-> IMAP system flags: the one map.

Maildir (cr.yp.to/proto/maildir.html) stores flags as letters in the file name; IMAP
speaks system flags and keywords. ``$Forwarded`` is the keyword Dovecot, Thunderbird and
most servers use for Maildir's P. Letters are kept sorted (D F P R S T), as Maildir wants.
"""

from __future__ import annotations

from collections.abc import Iterable

MAILDIR_TO_IMAP = {"D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered",
                   "S": "\\Seen", "T": "\\Deleted"}
IMAP_TO_MAILDIR = {v.lower(): k for k, v in MAILDIR_TO_IMAP.items()}


def to_imap(letters: str, *, deleted: bool = True) -> tuple[str, ...]:
    """Maildir letters -> IMAP flags, in the letters' order. `deleted=False` leaves T out
    (an upload must not send \\Deleted: the message would vanish at the next EXPUNGE)."""
    return tuple(MAILDIR_TO_IMAP[c] for c in letters
                 if c in MAILDIR_TO_IMAP and (deleted or c != "T"))


def to_maildir(flags: Iterable[str]) -> str:
    """IMAP flags -> sorted Maildir letters (keywords other than $Forwarded have none)."""
    return "".join(sorted({IMAP_TO_MAILDIR[f.lower()] for f in flags
                           if f.lower() in IMAP_TO_MAILDIR}))
