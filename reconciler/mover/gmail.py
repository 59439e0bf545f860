"""Gmail as a source: every message copied once, with its labels as folders.

Why: Gmail stores a message once and *labels* it; each label is shown as a folder
(`INBOX`, `Work`, `[Gmail]/Sent Mail`, `[Gmail]/Starred`, `[Gmail]/Important`, ...), and
`[Gmail]/All Mail` (`\\All`, RFC 6154) shows every message except Spam and Trash. Copied
folder by folder, a message with three labels is downloaded three times (and Gmail counts
each download against its 2.5 GB a day), and the `\\Starred` and `\\Important` folders
are copied as if they were folders. Where the server announces `X-GM-EXT-1`:

- one `UID FETCH 1:* (UID RFC822.SIZE X-GM-LABELS)` of All Mail says, per message, its
  labels; the source's folders become one folder per label: `\\Inbox` -> `INBOX`, `\\Sent`
  and `\\Draft` -> the folders Gmail marks `\\Sent` and `\\Drafts` (mapped by that use to
  the target's), a user label -> its name; a message with no label is in All Mail only
  (archived): it goes to the target's `\\Archive` folder (`Archive`). `\\Starred` is the
  `\\Flagged` flag Gmail already shows on the message, `\\Important` is Gmail's own
  ranking: neither is a folder. Spam and Trash (not in All Mail) are copied as folders;
- every label folder's messages are All Mail UIDs, fetched from All Mail. The first
  label folder that needs a message fetches and appends it; every other label folder gets
  it by a `UID COPY` on the target from the copy already there (`pipeline.py`), so its
  body leaves Gmail once;
- the listing entries are shared between the label folders, so the content hash learnt
  while copying one folder is known to the next.

A label folder's listing has no UIDVALIDITY/UIDNEXT state of its own (its UIDs are All
Mail's): it is listed on every pass, never skipped as unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mailferry.mail.imap import mutf7
from mailferry.mail.imap.client import ImapClient, Untagged, as_int, fetch_items
from reconciler.mover.folders import Folder, canonical
from reconciler.mover.listing import Entry, Listing

# Gmail's system labels -> the special use of the folder they stand for ("" = INBOX)
LABEL_USES = {"\\inbox": "", "\\sent": "\\Sent", "\\draft": "\\Drafts"}
NOT_FOLDERS = {"\\starred", "\\important"}  # a flag, and Gmail's own ranking


class LabelSource(Protocol):
    """What the label view needs of its endpoint (`endpoints.ImapEndpoint` is one)."""

    prefix: str

    @property
    def validity(self) -> str: ...

    async def select(self, name: str) -> bool: ...

    def client_for_labels(self) -> ImapClient: ...


class GmailLabels:
    """The label view of one Gmail mailbox, on its (read-only) endpoint."""

    def __init__(self, endpoint: LabelSource) -> None:
        self.endpoint = endpoint
        self.all_mail: str | None = None
        self.by_folder: dict[str, list[str]] = {}
        self.entries: dict[str, Entry] = {}  # All Mail UID -> its entry, shared by folders
        self.validity = ""

    def owns(self, name: str) -> bool:
        """Whether `name` is a label folder (its messages are All Mail's)."""
        return self.all_mail is not None and name in self.by_folder

    async def folders(self, listed: list[Folder]) -> list[Folder]:
        """The label folders, Spam and Trash; `listed` as it is without an All Mail."""
        all_mail = next((f for f in listed if f.special_use == "\\All" and f.selectable),
                        None)
        if all_mail is None:
            return listed
        self.all_mail = all_mail.name
        by_use = {f.special_use: f for f in listed if f.special_use}
        ep = self.endpoint
        if not await ep.select(all_mail.name):
            return listed
        self.validity = ep.validity
        labelled: dict[str, list[str]] = {}
        self.entries = {}

        def collect(resp: Untagged) -> None:
            items = fetch_items(resp)
            if items is None or b"UID" not in items:
                return
            uid = str(as_int(items[b"UID"]))
            self.entries[uid] = Entry(uid=uid, size=as_int(items.get(b"RFC822.SIZE")),
                                      message_id="")
            raw = items.get(b"X-GM-LABELS")
            names: list[str] = []
            for label in raw if isinstance(raw, list) else []:
                if not isinstance(label, bytes):
                    continue
                text = label.decode("utf-8", "replace")
                lowered = text.lower()
                if lowered in NOT_FOLDERS:
                    continue
                if lowered in LABEL_USES:
                    use = LABEL_USES[lowered]
                    folder = by_use.get(use) if use else None
                    names.append("INBOX" if not use else folder.name if folder else
                                 use.lstrip("\\"))
                elif not text.startswith("\\"):
                    names.append(canonical(mutf7.decode(text), "/", ep.prefix))
            for name in names or [all_mail.name]:
                labelled.setdefault(name, []).append(uid)

        await ep.client_for_labels().simple("UID FETCH 1:* (UID RFC822.SIZE X-GM-LABELS)",
                                           handler=collect)
        self.by_folder = labelled
        native = {f.name: f for f in listed}
        result = [Folder(name, native[name].native if name in native else name,
                         "\\Archive" if name == all_mail.name else
                         native[name].special_use if name in native else None)
                  for name in labelled]
        result += [f for f in listed if f.special_use in ("\\Junk", "\\Trash")
                   and f.name not in labelled]
        return result

    def listing(self, name: str) -> Listing:
        """A label folder: its All Mail entries (sizes, hashes learnt so far)."""
        return Listing(self.validity, [self.entries[u] for u in self.by_folder.get(name, ())])

    def source_of(self, name: str, uids: Sequence[str]) -> str:
        """Where a label folder's messages are fetched from: All Mail."""
        assert self.all_mail is not None and all(u in self.entries for u in uids)
        return self.all_mail
