"""What a listing of a folder is: its messages (no bodies) under one validity.

Apart from `endpoints.py`, which lists folders, so that `gmail.py` (whose label folders are
listings of All Mail's entries) and the endpoints both use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Entry:
    """One message in a listing (no body)."""

    uid: str  # IMAP UID, or a driver's message key
    size: int
    message_id: str  # "" when the message has none
    flags: tuple[str, ...] = ()
    date: str | None = None  # INTERNALDATE, IMAP syntax
    sha256: str | None = None  # known without reading the body (drivers, the manifest)


@dataclass
class Listing:
    """A folder's messages under one validity."""

    validity: str
    entries: list[Entry] = field(default_factory=list)
    # "UIDVALIDITY/UIDNEXT/MESSAGES" when the listing was taken (IMAP), "" when unknown:
    # the same triple later means the very same messages (see pipeline's shortcut).
    state: str = ""
