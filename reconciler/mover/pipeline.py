"""Copy one mailbox from a source endpoint to a target endpoint, then prove it (E15, E17's
mail half, E41's last delta).

Why this shape: speed and proof come from the same idea, *know every message by the hash
of its bytes*, and from never waiting on one message at a time.

Per source folder:

1. **List** both sides, metadata only (UID, size, flags, INTERNALDATE, Message-ID). The
   manifest turns cached UIDs (same UIDVALIDITY) into hashes without reading a body.
2. **Resolve** target messages the manifest does not know but that could be a source
   message (same size and Message-ID): fetch and hash them. This is the crash case: an
   APPEND that completed just before a kill -9 is recognised, not repeated.
3. **Match** source hashes against the target's multiset of hashes. Matched: present.
4. **Stream** the rest: one pipelined UID FETCH, each body hashed as it arrives (a source
   message whose hash is now known to be in the target is present after all), the others
   batched into MULTIAPPENDs kept several in flight. A bounded number of batches in flight
   is the back-pressure that bounds memory by (batches x batch size + the largest message),
   never by the mailbox.
5. **Read back**: as each MULTIAPPEND completes, the UIDs the target gave (APPENDUID,
   RFC 4315) are fetched back on the same connection (`UID FETCH ... BODY.PEEK[]`, while
   the next batches are in flight) and hashed: a message counts as copied only when the
   bytes the *target returns* hash to the source's hash (or, for a target whose rewrite
   the policy accepted, to the hash of the source after that rewrite: `rewrites.py`). The
   read-back hash and what it proved go into the manifest; an altered copy is recorded
   too (so it is never appended again) but proves nothing.
6. **Verify**: list the target folder again; every source hash must be held by a target
   UID whose *recorded read-back hash* proves it (never a size); anything unresolved is
   fetched and hashed. ``verify="deep"`` fetches and hashes every target message instead
   and checks it against the recorded read-back.

Nothing is ever deleted or changed on the source (it is opened read-only, EXAMINE and
BODY.PEEK) nor on the target (append only). Flags of messages already present are not
touched: BOX2 is live, its owner may have read them since.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from mailferry.mail.imap.client import Literal, WireHash
from reconciler.mover.endpoints import (
    AppendResult,
    Digest,
    Endpoint,
    Outgoing,
    StreamingTarget,
    content_hash,
    header_message_id,
    wire_form,
)
from reconciler.mover.folders import VIRTUAL_USES, Folder, FolderRule, map_folders, ruled
from reconciler.mover.listing import Entry, Listing
from reconciler.mover.manifest import PROOF, Manifest, ManifestRow
from reconciler.mover.pace import BudgetSpent, Shed, SystemPace
from reconciler.mover.progress import Progress
from reconciler.mover.rewrites import (
    IDENTICAL,
    REWRITES,
    Judgement,
    StreamedRewrites,
    describe,
    equivalent_hashes,
    example,
    hint,
    judge,
)
from reconciler.mover.throttle import Throttle

_HEAD_KEPT = 1 << 16  # of a streamed message: where its Message-ID is read from


@dataclass
class Options:
    """Tuning and behaviour of a copy."""

    rules: tuple[FolderRule, ...] = ()
    verify: str = "fast"  # fast | deep
    phase: str = "copy"  # prestage | copy | final: recorded with the run
    batch_messages: int = 50
    batch_bytes: int = 2 << 20
    appends_in_flight: int = 3
    flush_rows: int = 1000
    # A message larger than this streams from the source's FETCH into its own APPEND,
    # chunk by chunk (memory: a chunk, not the message), when the target can take it.
    stream_over: int = 1 << 20
    # Rewrites on store the policy accepts for this target (names of `rewrites.REWRITES`):
    # a copy then proves the source when the target holds rewrite(source) byte for byte.
    accepted: frozenset[str] = frozenset()
    target_name: str = ""  # the target system's name, for the report ("" -> its label)
    # A pass that need not prove the target now (prestage, `mover copy` without
    # `--read-target`): when every source folder is as at the last verified pass, the
    # target is not even connected to (`MailboxCopy._source_only`). Never a final pass.
    leave_target: bool = False


@dataclass
class FolderReport:
    """What happened to one source folder."""

    folder: str
    target: str
    messages: int = 0
    copied: int = 0
    present: int = 0
    bytes_copied: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source uid, reason)
    missing: int = 0  # source messages not proven in the target after the copy
    src_state: str = ""  # UIDVALIDITY/UIDNEXT/MESSAGES of the listings that were proven
    dst_state: str = ""
    unchanged: bool = False  # both sides as at the last verified pass: nothing listed
    equivalent: int = 0  # proven under an accepted rewrite, not byte for byte
    altered: int = 0  # the target holds a changed copy: present, never a proof
    alteration: str = ""  # proof kind of the first altered copy ("altered:8bit-headers-as-x")
    example: str = ""  # an example of that change
    # Why the manifest's rows for this folder were not trusted this pass ("" when they
    # were, or there were none): see `MailboxCopy._source_cache`, `_target_unmasked`.
    distrusted: str = ""


@dataclass
class MailboxReport:
    """The per-mailbox report: copied, already present, failed with reason, verified."""

    key: str
    folders: list[FolderReport] = field(default_factory=list)
    messages_total: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    verified: bool = False
    error: str | None = None
    attempts: int = 1
    throttled: int = 0  # attempts a system refused as too many (retried after a pause)
    retry_in: float | None = None  # still refused: seconds the pace asks to wait
    resume_at: datetime | None = None  # a daily budget is spent: when the copy resumes
    target: str = ""  # the target system, as the alteration message names it
    accepted: tuple[str, ...] = ()  # the rewrites the policy accepted for it
    # False: the pass stood on the last verified pass's proof, its source unchanged since,
    # and did not connect to the target (`Options.leave_target`)
    target_read: bool = True

    @property
    def copied(self) -> int:
        return sum(f.copied for f in self.folders)

    @property
    def present(self) -> int:
        return sum(f.present for f in self.folders)

    @property
    def failed(self) -> int:
        return sum(len(f.failed) for f in self.folders)

    @property
    def missing(self) -> int:
        return sum(f.missing for f in self.folders)

    @property
    def bytes_copied(self) -> int:
        return sum(f.bytes_copied for f in self.folders)

    @property
    def altered(self) -> int:
        return sum(f.altered for f in self.folders)

    @property
    def equivalent(self) -> int:
        return sum(f.equivalent for f in self.folders)

    def alteration(self) -> str:
        """What the admin must read when the target changed what it stored, or ""."""
        first = next((f for f in self.folders if f.altered), None)
        if first is None:
            return ""
        kind = first.alteration
        text = (f"target {self.target or '?'} altered {self.altered} messages on store: "
                f"{describe(kind)}")
        if first.example:
            text += f" (e.g. {first.example})"
        fix = hint(kind)
        name = kind.partition(":")[2]
        text += "; fix the server" + (f" ({fix})" if fix else "")
        if name in REWRITES:
            text += (f" or accept the equivalence in the policy (acceptStoreRewrites: "
                     f"[{{system: {self.target or '?'}, rewrite: {name}}}])")
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (failures listed with their reasons, 20 at most per folder)."""
        return {
            "mailbox": self.key, "verified": self.verified, "copied": self.copied,
            "present": self.present, "failed": self.failed, "missing": self.missing,
            "bytes_copied": self.bytes_copied, "messages": self.messages_total,
            "bytes": self.bytes_total, "seconds": round(self.seconds, 3),
            "attempts": self.attempts, "error": self.error, "throttled": self.throttled,
            "resume_at": self.resume_at.isoformat() if self.resume_at else None,
            "altered": self.altered, "equivalent": self.equivalent,
            "alteration": self.alteration() or None, "accepted": list(self.accepted),
            "proof": PROOF, "target_read": self.target_read,
            "folders": [{"folder": f.folder, "target": f.target, "messages": f.messages,
                         "copied": f.copied, "present": f.present, "missing": f.missing,
                         "src_state": f.src_state, "dst_state": f.dst_state,
                         "unchanged": f.unchanged, "altered": f.altered,
                         "equivalent": f.equivalent, "alteration": f.alteration,
                         "example": f.example, "distrusted": f.distrusted,
                         "failed": [{"uid": u, "reason": r} for u, r in f.failed[:20]]}
                        for f in self.folders],
        }


class _Rows:
    """Manifest rows waiting to be written, flushed in batches."""

    def __init__(self, manifest: Manifest | None, key: str, every: int) -> None:
        self.manifest = manifest
        self.key = key
        self.every = every
        self.rows: list[ManifestRow] = []

    def add(self, row: ManifestRow) -> None:
        if self.manifest is not None:
            self.rows.append(row)
            if len(self.rows) >= self.every:
                self.flush()

    def flush(self) -> None:
        if self.manifest is not None and self.rows:
            rows, self.rows = self.rows, []
            self.manifest.add(self.key, rows)


class MailboxCopy:
    """One pass over one mailbox."""

    def __init__(self, key: str, source: Endpoint, target: Endpoint, *,
                 manifest: Manifest | None = None, progress: Progress | None = None,
                 throttle: Throttle | None = None, options: Options | None = None) -> None:
        self.key = key
        self.source = source
        self.target = target
        self.manifest = manifest
        self.progress = progress or Progress()
        self.throttle = throttle or Throttle()
        self.options = options or Options()
        self.rows = _Rows(manifest, key, self.options.flush_rows)
        # Each side's system pace (`pace.py`): its rate, its daily budget.
        paces = (getattr(source, "pace", None), getattr(target, "pace", None))
        self._failed: asyncio.Future[None] | None = None  # of the running `_stream`
        # content hash -> (target folder, UID) of a copy made or found in this pass: a
        # message another target folder needs too is copied there on the target (Gmail's
        # labels: `gmail.py`), not fetched from the source again
        self.stored_at: dict[str, tuple[str, str]] = {}
        self.paces: list[SystemPace] = [p for i, p in enumerate(paces)
                                        if p is not None and p not in paces[:i]]
        # target folder -> UIDs already matched to a source message in this pass (two source
        # folders mapped into one target folder must not claim the same target copy)
        self.claimed: dict[str, set[str]] = defaultdict(set)
        # target folder -> hashes already counted for an earlier source folder's proof
        self.consumed: dict[str, Counter[str]] = defaultdict(Counter)

    async def run(self) -> MailboxReport:
        """Open both sides (the target only when needed, see `_source_only`), list, copy
        and verify every folder; record the figures."""
        started = time.monotonic()
        report = MailboxReport(self.key)
        report.target = self.options.target_name or self.target.label
        report.accepted = tuple(sorted(self.options.accepted))
        last = self.manifest.last_states(self.key) \
            if self.manifest is not None and self.options.verify != "deep" else {}
        if self.options.leave_target and self.options.phase != "final" and last:
            # The source first, alone: when it is as the last proof saw it, the target's
            # login (on Dovecot an `imap-login` and an `imap` process) is never made.
            await self.source.open()
            src_folders = _real_folders(await self.source.folders())
            kept = self._source_only(src_folders, last)
            if kept is not None:
                report.folders, report.target_read = kept, False
                report.messages_total = sum(f.messages for f in kept)
                self.progress.mailbox_started(self.key, report.messages_total, 0)
                report.verified = True  # the last verified pass's proof, standing
                report.seconds = time.monotonic() - started
                return report
            await self.target.open()
            dst_folders = await self.target.folders()
        else:
            await asyncio.gather(self.source.open(), self.target.open())
            # Both sides at once: on a re-run with nothing to do this is most of the time.
            listed, dst_folders = await asyncio.gather(self.source.folders(),
                                                       self.target.folders())
            src_folders = _real_folders(listed)
        separator = getattr(self.source, "separator", "/")
        mapping = map_folders(src_folders, dst_folders, self.options.rules, separator)
        # The final pass is the proof E41 deletes by: it lists every folder, so that the
        # rows are checked against what each side holds now (`_source_cache`,
        # `_target_unmasked`), not only the folders' states.
        unchanged = self._unchanged(src_folders, mapping, last) \
            if self.options.phase != "final" else {}
        listings: list[tuple[Folder, Listing]] = []
        for folder in src_folders:
            if not folder.selectable or folder.name in unchanged:
                continue
            # UID and size only: flags and dates come with the bodies of what is copied,
            # Message-IDs from those bodies; a re-run reads no header at all.
            listing = await self.source.listing(folder.name, full=False)
            if listing is not None:
                listings.append((folder, listing))
        report.folders.extend(unchanged.values())
        report.messages_total = sum(len(lst.entries) for _, lst in listings) \
            + sum(f.messages for f in unchanged.values())
        report.bytes_total = sum(e.size for _, lst in listings for e in lst.entries)
        self.progress.mailbox_started(self.key, report.messages_total, report.bytes_total)
        try:
            for folder, listing in listings:
                report.folders.append(await self._folder(
                    folder.name, listing, mapping[folder.name],
                    keep_prior=not ruled(folder.name, folder.native, self.options.rules)))
        finally:
            self.rows.flush()
        # Verified: every source message held by a target copy whose read-back proved it.
        report.verified = report.missing == 0 and report.failed == 0 and report.altered == 0
        report.seconds = time.monotonic() - started
        return report

    def _source_only(self, src_folders: list[Folder],
                     last: dict[str, tuple[str, str, str, int]]) -> list[FolderReport] | None:
        """The folders' reports when every selectable source folder is exactly as at the
        last verified pass (the state argument of `_unchanged`, source side) and goes to
        the same target folder; else None (the target is opened and read as always).

        Why a pass may then leave the target unread: it has nothing to copy (the source
        holds the very messages the last verified pass proved, by the target's own bytes,
        to be in the target), so it appends nothing (no duplicate) and changes nothing. What
        it cannot see is a target that lost mail since; it does not claim to: its report
        says `target_read: false` and keeps the target states of that proof, so the next
        pass that reads the target compares them with the target's states and lists and
        copies again if they differ. Only passes that prove nothing new about the target may
        do this (`Options.leave_target`: prestage, `mover copy` without `--read-target`);
        E15 (state 8) and the final pass before E41 always read it."""
        src_now = getattr(self.source, "folder_status", {})
        selectable = [f for f in src_folders if f.selectable]
        if not selectable:
            return None
        ruled_to = map_folders(selectable, [], self.options.rules,
                               getattr(self.source, "separator", "/"))
        kept = []
        for f in selectable:
            if f.name not in last or src_now.get(f.name) != last[f.name][0]:
                return None
            src_state, target, dst_state, messages = last[f.name]
            if ruled(f.name, f.native, self.options.rules) and ruled_to[f.name] != target:
                return None  # a folderMap rule sends it elsewhere now
            kept.append(FolderReport(f.name, target, messages=messages, present=messages,
                                     src_state=src_state, dst_state=dst_state,
                                     unchanged=True))
        return kept

    def _unchanged(self, src_folders: list[Folder], mapping: dict[str, str],
                   last: dict[str, tuple[str, str, str, int]]) -> dict[str, FolderReport]:
        """Folders whose source and target are exactly as at the last verified pass.

        Why no listing is needed, and the E41 rule ("every source message is in BOX2") still
        holds. A state is "UIDVALIDITY/UIDNEXT/MESSAGES". RFC 3501 (2.3.1.1): under one
        UIDVALIDITY a UID names one message forever, never reused; a message's content never
        changes; every APPEND/COPY/delivery takes a UID >= UIDNEXT and UIDNEXT MUST then
        grow, even if the new message is expunged again. So, per side, same UIDVALIDITY and
        same UIDNEXT = no message added since; then the UIDs present are a subset of those
        present then, and the same MESSAGES count = none removed: the very same messages.
        The recorded states are those of the listings the proof was made from, taken at
        their EXAMINE (before the UID FETCH), so a change racing with the listing can only
        make the states differ later (a re-list), never hide a change. The last *verified*
        pass proved every source message of the folder in its target folder; both folders
        hold the same messages as then; so the proof still holds, message for message.
        A UIDVALIDITY of 0 (no validity) gives no state. HIGHESTMODSEQ (CONDSTORE) is not
        compared: it moves with every flag change, which changes no content and would only
        defeat the shortcut on a live BOX2 whose owner reads mail.

        Both sides' states come from one `LIST ... RETURN (STATUS ...)` each (RFC 5819), or
        pipelined STATUS commands without it, so a re-run with nothing to do lists no
        message at all. `verify: deep` never takes the shortcut."""
        src_now = getattr(self.source, "folder_status", {})
        dst_now = getattr(self.target, "folder_status", {})
        if not last or not src_now or not dst_now:
            return {}
        result = {}
        for folder, (src_state, target, dst_state, messages) in last.items():
            if src_now.get(folder) == src_state and dst_now.get(target) == dst_state:
                result[folder] = FolderReport(folder, target, messages=messages,
                                              present=messages, src_state=src_state,
                                              dst_state=dst_state, unchanged=True)
        # Source folders merged into one target folder each need their own copies (the
        # proof subtracts what an earlier folder claimed): when one of them is listed,
        # all of them are, or a changed folder could count an unchanged one's copy.
        busy = {last[f.name][1] if f.name in last else mapping.get(f.name)
                for f in src_folders if f.selectable and f.name not in result}
        return {name: r for name, r in result.items() if r.target not in busy}

    async def _target_listing(self, name: str) -> Listing:
        listing = await self.target.listing(name, full=False)
        if listing is None:
            await self.target.create_folder(name)
            listing = await self.target.listing(name, full=False)
        return listing or Listing("")

    def _effective(self, proof: str) -> str:
        """A recorded proof as it counts now, under the rewrites the policy accepts now: an
        equivalence no longer accepted is an alteration again, and an alteration recorded
        as a known rewrite (its hash was recomputed from the source and matched the
        read-back exactly) becomes an equivalence once the admin accepts that rewrite."""
        kind, _, name = proof.partition(":")
        if kind == "equivalent" and name not in self.options.accepted:
            return f"altered:{name}"
        if kind == "altered" and name in REWRITES and name in self.options.accepted:
            return f"equivalent:{name}"
        return proof

    def _holdings(self, cached: list[ManifestRow], dst_name: str,
                  validity: str) -> dict[str, Held]:
        """Target UID -> what the manifest proved it holds: only rows with a read-back hash
        (revision 0005) under the target's current UIDVALIDITY. A row without one (an
        APPEND whose read-back never came, or a row from before read-backs) proves nothing:
        that target message is fetched and hashed again when it matters."""
        return {r.dst_uid: Held(r.sha256, r.dst_sha256, r.proof, r.proof_note, size=r.size)
                for r in cached
                if r.dst_folder == dst_name and r.dst_validity == validity and r.dst_uid
                and r.dst_sha256 and r.proof}

    @staticmethod
    def _source_cache(cached: list[ManifestRow], src: Listing,
                      report: FolderReport) -> dict[str, str]:
        """Source UID -> hash, from the rows under the folder's current UIDVALIDITY: trusted
        as a whole or not at all. A UID's content never changes under one UIDVALIDITY
        (RFC 3501), but a folder deleted and made again can come back under the old one
        (Dovecot's is a creation time in seconds; some servers number every folder from 1)
        with other messages at the old UIDs. Taken at their word, the rows would call those
        messages present wherever the old ones were copied, and the pass verified with
        them never read. So every row is checked against the listing's size for its UID
        (free: the listing has it); one that differs means the folder is not the one the
        rows describe, and none of its rows is used: every body is read and hashed."""
        rows = {r.src_uid: r for r in cached if r.src_validity == src.validity}
        if not rows:
            return {}
        for e in src.entries:
            r = rows.get(e.uid)
            if r is not None and (r.size != e.size or (
                    e.message_id and r.message_id and e.message_id != r.message_id)):
                report.distrusted = (
                    f"source UID {e.uid} is {e.size} bytes where the manifest recorded "
                    f"{r.size} under the same UIDVALIDITY {src.validity}: the folder was made "
                    "again; every message read")
                return {}
        return {uid: r.sha256 for uid, r in rows.items()}

    @staticmethod
    def _target_unmasked(held: dict[str, Held], dst: Listing, report: FolderReport) -> bool:
        """The final pass's check of the target side: a UID whose read-back proved an
        identical copy must still list the size of the message it copies. One that does
        not means the target folder was made again under its old UIDVALIDITY, and none of
        its recorded proofs stands: its messages are hashed again (`_resolve`) and what is
        not there is copied. Only in the final pass: the rows keep the source's size, so a
        target that lists another size for the same bytes (an estimate, as some hosted
        servers give) costs that pass a reading of the folder, never a wrong proof."""
        for d in dst.entries:
            known = held.get(d.uid)
            if known is not None and known.proof == IDENTICAL and known.size is not None \
                    and known.size != d.size:
                report.distrusted = (
                    f"target UID {d.uid} is {d.size} bytes where the manifest proved a copy of "
                    f"{known.size} under the same UIDVALIDITY {dst.validity}: the target "
                    "folder was made again; its messages read again")
                return True
        return False

    def _count_alteration(self, report: FolderReport, proof: str, note: str) -> None:
        if proof.startswith("altered:"):
            report.altered += 1
            if not report.alteration:
                report.alteration, report.example = proof, note

    async def _folder(self, name: str, src: Listing, dst_name: str,
                      keep_prior: bool = True) -> FolderReport:
        cached = self.manifest.load(self.key, name) if self.manifest is not None else []
        if keep_prior and cached and cached[-1].dst_folder:
            # A target chosen by special use in an earlier pass stays the target, even if
            # the target's folders changed since: a re-run must never copy elsewhere.
            dst_name = cached[-1].dst_folder
        report = FolderReport(name, dst_name, messages=len(src.entries))
        src_cache = self._source_cache(cached, src, report)
        dst = await self._target_listing(dst_name)
        held = self._holdings(cached, dst_name, dst.validity)
        if held and self.options.phase == "final" and self._target_unmasked(held, dst, report):
            held = {}
        for e in src.entries:
            e.sha256 = e.sha256 or src_cache.get(e.uid)
        claimed = self.claimed[dst_name]
        for d in dst.entries:
            known = held.get(d.uid)
            d.sha256 = known.source if known is not None else d.sha256
        await self._resolve(dst_name, [d for d in dst.entries if d.uid not in claimed],
                            src.entries, deep=False)

        pool: dict[str, list[str]] = defaultdict(list)
        for d in dst.entries:
            if d.sha256 and d.uid not in claimed:
                pool[d.sha256].append(d.uid)
        placed: dict[str, Held] = {}  # dst uid -> what its read-back proved (this pass)

        def present(e: Entry, data: bytes | None = None) -> bool:
            """The target already holds a copy of `e`: by its hash, or (a copy stored by a
            target that rewrites, then lost from the manifest by a crash) by the hash of a
            known rewrite of it. Such a copy is never appended again; it proves `e` only
            when identical, or equivalent under an accepted rewrite."""
            uids = pool.get(e.sha256 or "")
            known: Held
            if uids:
                uid = uids.pop()
                known = held.get(uid) or Held(e.sha256 or "", e.sha256, IDENTICAL)
            else:
                alternatives = equivalent_hashes(data, set(REWRITES)) if data else {}
                match = next(((h, n) for h, n in alternatives.items() if pool.get(h)), None)
                if match is None or data is None:
                    return False
                uid = pool[match[0]].pop()
                rewrite = match[1]
                kind = "equivalent" if rewrite in self.options.accepted else "altered"
                # the target holds exactly rewrite(source): the example is recomputed
                known = Held(e.sha256 or "", match[0], f"{kind}:{rewrite}",
                             example(data, REWRITES[rewrite].apply(data)))
            claimed.add(uid)
            self.stored_at.setdefault(e.sha256 or "", (dst_name, uid))
            # what this pass learnt about the UID counts in its verification, whether or
            # not the manifest rows are written yet
            placed[uid] = Held(known.source, known.stored, known.proof, known.note,
                               dst.validity)
            report.present += 1
            proof = self._effective(known.proof or IDENTICAL)
            self._count_alteration(report, proof, known.note)
            report.equivalent += proof.startswith("equivalent:")
            self.progress.advanced(self.key, 1, e.size)
            if src_cache.get(e.uid) != e.sha256 or uid not in held:
                self.rows.add(ManifestRow(name, e.sha256 or "", e.size, e.message_id, False,
                                          src.validity, e.uid, dst_name, dst.validity, uid,
                                          known.stored, known.proof, known.note))
            return True

        to_read = [e for e in src.entries if not present(e)]
        moved = await self._copy_within(name, src, dst_name, to_read, report)
        to_read = [e for e in to_read if e.uid not in moved]
        to_read, spent = self._budget(to_read)
        report.src_state, report.dst_state = src.state, dst.state
        # Sizes a target copy of a message may have (a known rewrite keeps the length): a
        # message of another size cannot be present, so it may stream straight in.
        sizes = {d.size for d in dst.entries if d.uid not in claimed}
        if spent is not None:
            # What fits in today's budget is copied and recorded; the rest waits for the
            # next day (the manifest rows are written by `run`, whatever happens).
            await self._stream(name, src, dst_name, to_read, present, placed, report, sizes)
            raise spent
        if to_read or moved or self.options.verify == "deep":
            await self._stream(name, src, dst_name, to_read, present, placed, report, sizes)
            report.dst_state = await self._verify(name, src, dst_name, placed, report)
        else:
            # The listing just taken proves it: every source message is matched to its own
            # target UID, whose recorded read-back hash (or a hash just read) is the
            # source's; altered copies were counted by `present`.
            self.consumed[dst_name].update(e.sha256 for e in src.entries if e.sha256)
        return report

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """An append task whose failure ends the stream it belongs to (`_stream`)."""
        task = asyncio.create_task(coro)

        def done(t: asyncio.Task[None]) -> None:
            failed = self._failed
            if failed is not None and not t.cancelled() and t.exception() is not None \
                    and not failed.done():
                failed.set_exception(cast(BaseException, t.exception()))
        task.add_done_callback(done)
        return task

    async def _copy_within(self, name: str, src: Listing, dst_name: str,
                           to_read: list[Entry], report: FolderReport) -> set[str]:
        """Messages of `to_read` whose copy this pass already made (or found) in another
        target folder: `UID COPY` there on the target (the server copies its own bytes;
        the verification proves them like any copy). Their source UIDs."""
        copy = getattr(self.target, "copy_within", None)
        if not callable(copy):
            return set()
        groups: dict[str, dict[str, Entry]] = defaultdict(dict)
        for e in to_read:
            at = self.stored_at.get(e.sha256 or "")
            if at is not None and at[0] != dst_name and at[1] not in groups[at[0]]:
                groups[at[0]][at[1]] = e
        moved: set[str] = set()
        for folder, items in groups.items():
            if not items:
                continue
            order = sorted(items, key=int)
            result: AppendResult = await copy(folder, order, dst_name)
            size = 0
            for stored, uid in zip(order, result.uids, strict=True):
                e = items[stored]
                self.rows.add(ManifestRow(name, e.sha256 or "", e.size, e.message_id, True,
                                          src.validity, e.uid, dst_name, result.validity, uid,
                                          None, None, ""))
                moved.add(e.uid)
                size += e.size
            report.copied += len(order)
            report.bytes_copied += size
            self.progress.advanced(self.key, len(order), size, copied=len(order))
        return moved

    def _budget(self, to_read: list[Entry]) -> tuple[list[Entry], BudgetSpent | None]:
        """The messages that fit in today's byte budget of both systems, in UID order, and
        the spent budget when some do not."""
        for i, e in enumerate(to_read):
            for pace in self.paces:
                if not pace.reserve(e.size):
                    return to_read[:i], pace.spent()
        return to_read, None

    async def _pace(self, size: int) -> None:
        await self.throttle.take(size)
        for pace in self.paces:
            if pace.shed():
                raise Shed(f"{pace.system} asked for fewer connections: this copy gives its "
                           f"connection back and resumes later")
            await pace.take(size)

    async def _resolve(self, folder: str, entries: list[Entry], wanted: list[Entry], *,
                       deep: bool) -> None:
        """Hash the target messages whose hash is unknown and that could be a wanted one."""
        # Target listings carry sizes only (no Message-ID: cheaper for the server), so a
        # candidate is any unknown target message of the size of a wanted one.
        sizes = {e.size for e in wanted}
        todo = {d.uid: d for d in entries if d.sha256 is None and (deep or d.size in sizes)}
        if not todo:
            return

        async def hashed(uid: str, data: bytes, _f: object, _d: object) -> None:
            if uid in todo:
                todo[uid].sha256 = body_hash(data)

        await self.target.read_back(folder, list(todo), hashed)

    async def _read_back(self, dst_name: str, items: list[tuple[Entry, Outgoing, str]],
                         validity: str | None, placed: dict[str, Held], *,
                         alternatives: dict[str, str] | None = None) -> dict[str, Held]:
        """Fetch what the target stored under the UIDs it gave, hash it, judge each copy.

        Why this and not the size: the only proof that the target holds the source's
        message is the target's own bytes. Bytes are kept only for a copy whose hash
        differs (to show an example); big bodies are hashed as they stream by."""
        expected = {uid: e.sha256 for e, _, uid in items}
        stored: dict[str, tuple[str, bytes | None]] = {}

        again: list[str] = []

        async def got(uid: str, data: bytes, _f: object, _d: object) -> None:
            if uid in expected and uid not in stored:
                if isinstance(data, Digest):
                    sha = data.sha256
                    if data.raw and sha != expected[uid]:
                        again.append(uid)  # see below
                        return
                else:  # hashed as served first: the line-end scan only on a mismatch
                    sha = hashlib.sha256(data).hexdigest()
                    if sha != expected[uid]:
                        sha = content_hash(data)
                keep = None if sha == expected[uid] or isinstance(data, Digest) else data
                stored[uid] = (sha, keep)

        # A body is hashed as served (no line-end scan: a third of the CPU of a big one).
        # Equal to the source's wire-form hash, the target serves exactly the source's
        # wire form: identical, as the wire-form hash would say. Unequal, it is hashed in
        # wire form (a big one read once more for that), so a bare LF never passes for an
        # alteration.
        await self.target.read_back(dst_name, list(expected), got, raw=True)
        if again:
            await self.target.read_back(dst_name, again, got)
        result: dict[str, Held] = {}
        for e, out, uid in items:
            if uid not in stored:
                continue  # never came back: unproven, the verification fetches it again
            sha, data = stored[uid]
            # a streamed message was never held: its equivalences were hashed in flight;
            # an identical copy needs no wire form of what was sent
            sent = wire_form(out.data) if alternatives is None and sha != e.sha256 else None
            verdict: Judgement = judge(e.sha256 or "", sent, sha, data,
                                       self.options.accepted, alternatives=alternatives)
            result[uid] = placed[uid] = Held(e.sha256 or "", sha, verdict.proof, verdict.note,
                                             validity)
        return result

    async def _stream(self, name: str, src: Listing, dst_name: str, to_read: list[Entry],
                      present: Any, placed: dict[str, Held],
                      report: FolderReport, sizes: set[int] | None = None) -> None:
        """Fetch, hash and append what the target lacks, several batches in flight; read
        each batch back from the target as soon as its APPEND completes. A big message
        whose size no target message has streams from the FETCH into its own APPEND."""
        if not to_read:
            return
        by_uid = {e.uid: e for e in to_read}
        seen: set[str] = set()
        batch: list[tuple[Entry, Outgoing]] = []
        batch_bytes = 0
        slots = asyncio.Semaphore(self.options.appends_in_flight)
        tasks: list[asyncio.Task[None]] = []

        async def append(items: list[tuple[Entry, Outgoing]], started: Any = None,
                         alternatives: dict[str, str] | None = None,
                         wire_size: int | None = None) -> None:
            try:
                result: AppendResult = (
                    await self.target.append(dst_name, [o for _, o in items])
                    if started is None
                    else await cast(StreamingTarget, self.target).append_finish(
                        started, wire_size=wire_size))
                given = [(e, out, uid) for (e, out), uid, error
                         in zip(items, result.uids, result.errors, strict=True)
                         if error is None and uid is not None]
                proofs = await self._read_back(dst_name, given, result.validity, placed,
                                               alternatives=alternatives) if given else {}
            finally:
                slots.release()
            copied = size = 0
            for (e, out), uid, error in zip(items, result.uids, result.errors, strict=True):
                if error is not None:
                    report.failed.append((e.uid, f"append refused: {error}"))
                    self.progress.advanced(self.key, 1, e.size, failed=1)
                    continue
                copied += 1
                size += len(out.data) or e.size
                proof = proofs.get(uid or "")
                if uid is not None and proof is not None and proof.proof == IDENTICAL:
                    self.stored_at.setdefault(e.sha256 or "", (dst_name, uid))
                self.rows.add(ManifestRow(
                    name, e.sha256 or "", e.size, e.message_id, True, src.validity, e.uid,
                    dst_name, result.validity, uid, proof.stored if proof else None,
                    proof.proof if proof else None, proof.note if proof else ""))
            report.copied += copied
            report.bytes_copied += size
            self.progress.advanced(self.key, copied, size, copied=copied)

        async def send() -> None:
            nonlocal batch, batch_bytes
            items, batch, batch_bytes = batch, [], 0
            await slots.acquire()  # back-pressure: at most N batches in flight
            tasks.append(self._spawn(append(items)))

        async def arrived(uid: str, data: bytes, flags: tuple[str, ...] | None,
                          date: str | None) -> None:
            nonlocal batch_bytes
            e = by_uid.get(uid)
            if e is None or uid in seen:
                return
            seen.add(uid)
            if flags is not None:
                e.flags = flags
            e.date = date or e.date
            if not e.message_id:
                e.message_id = header_message_id(data)
            wire = wire_form(data)
            sha = hashlib.sha256(wire).hexdigest()  # content_hash, the wire form kept
            if e.sha256 is not None and e.sha256 != sha:
                report.failed.append((uid, "changed since listing"))
                self.progress.advanced(self.key, 1, e.size, failed=1)
                return
            e.sha256 = sha
            # a copy under a known rewrite keeps the length: without a target message of
            # this size (as served, or as listed: the sizes `_resolve` hashed by) no
            # rewrite of it can be there (no equivalences to compute)
            if present(e, wire if sizes is None or len(wire) in sizes or e.size in sizes
                       else None):
                return
            await self._pace(len(data))
            batch.append((e, Outgoing(data, e.flags, e.date)))
            batch_bytes += len(data)
            if len(batch) >= self.options.batch_messages or batch_bytes >= self.options.batch_bytes:
                await send()

        streams = (getattr(self.source, "streams", False)
                   and callable(getattr(self.target, "append_stream", None)))

        def streamer(uid: str, flags: tuple[str, ...], date: str | None,
                     size: int) -> Callable[[Literal], Awaitable[bytes]] | None:
            """Stream this body into its own APPEND, if it is big and cannot be present."""
            e = by_uid.get(uid)
            if e is None or uid in seen or size <= self.options.stream_over \
                    or size in (sizes or ()) or e.size in (sizes or ()):
                return None
            seen.add(uid)
            e.flags, e.date = flags, date or e.date

            async def consume(literal: Literal) -> bytes:
                if batch:
                    await send()  # what came before goes first: the target keeps the order
                    await asyncio.sleep(0)
                await slots.acquire()
                try:
                    await self._pace(size)
                    wire, rewrites, head = WireHash(), StreamedRewrites(), bytearray()

                    async def chunks() -> AsyncIterator[bytes]:
                        while chunk := await literal.read():
                            fixed = wire.update(chunk)
                            rewrites.update(fixed)
                            if len(head) < _HEAD_KEPT:
                                head.extend(chunk[:_HEAD_KEPT - len(head)])
                            yield chunk
                    started = await cast(StreamingTarget, self.target).append_stream(
                        dst_name, e.flags, e.date, size, chunks())
                except BaseException:
                    slots.release()
                    raise
                sha = wire.hexdigest()
                if not e.message_id:
                    e.message_id = header_message_id(bytes(head))
                if e.sha256 is not None and e.sha256 != sha:
                    # IMAP forbids it (a UID's content never changes); the copy stands for
                    # what was read and is recorded, the admin is told
                    report.failed.append((uid, "changed since listing"))
                e.sha256 = sha
                tasks.append(self._spawn(append(
                    [(e, Outgoing(b"", e.flags, e.date))], started, rewrites.hashes(),
                    wire.wire_size)))
                return Digest.of(sha, size)
            return consume

        async def read_all() -> None:
            await self.source.fetch(name, [e.uid for e in to_read], arrived, meta=True,
                                    **({"stream": streamer} if streams else {}))
            if batch:
                await send()
            await asyncio.gather(*tasks)

        # An append that fails (a throttling answer, a broken target connection) stops the
        # source's FETCH at once: reading on would spend the source's rate and budget on
        # messages that cannot be stored in this attempt.
        reading = asyncio.create_task(read_all())
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._failed = failed
        try:
            await asyncio.wait({reading, failed}, return_when=asyncio.FIRST_COMPLETED)
            if failed.done() and not reading.done():
                reading.cancel()
                failed.result()  # the append's error
            await reading
        except BaseException:
            reading.cancel()
            for task in tasks:
                task.cancel()
            raise
        finally:
            if not failed.done():
                failed.cancel()
            elif not failed.cancelled():
                failed.exception()  # read: the error went up as the reading's, or with it
        for e in to_read:
            if e.uid not in seen:
                report.failed.append((e.uid, "vanished from the source during the copy"))

    async def _verify(self, name: str, src: Listing, dst_name: str, placed: dict[str, Held],
                      report: FolderReport) -> str:
        """Every source hash must be held, in the target folder's listing taken now, by a
        UID whose read-back proved it; return that listing's state.

        What counts for a target UID: its recorded read-back (this pass's, or the
        manifest's under the same UIDVALIDITY: a UID's content never changes), never its
        size; else the hash of its bytes fetched now. `deep` fetches every target message
        and trusts a recorded proof only when the bytes still hash to the recorded hash."""
        final = await self._target_listing(dst_name)
        deep = self.options.verify == "deep"
        cached = self.manifest.load(self.key, name) if self.manifest is not None else []
        held = self._holdings(cached, dst_name, final.validity)
        held.update({uid: h for uid, h in placed.items()
                     if h.validity is None or h.validity == final.validity})
        proof_of: dict[str, Held] = {}
        for d in final.entries:
            d.sha256 = None
            if not deep and d.uid in held:
                proof_of[d.uid] = held[d.uid]
                d.sha256 = held[d.uid].source
        need = Counter(e.sha256 for e in src.entries if e.sha256)
        unknown_source = sum(1 for e in src.entries if not e.sha256)
        consumed = self.consumed[dst_name]

        def tally() -> tuple[Counter[str], Counter[str], Counter[str]]:
            proven: Counter[str] = Counter()
            equivalent: Counter[str] = Counter()
            altered: Counter[str] = Counter()
            for d in final.entries:
                if not d.sha256:
                    continue
                known = proof_of.get(d.uid)
                proof = self._effective(known.proof or IDENTICAL) if known else IDENTICAL
                if proof.startswith("altered:"):
                    altered[d.sha256] += 1
                else:
                    proven[d.sha256] += 1
                    equivalent[d.sha256] += proof.startswith("equivalent:")
            return proven - consumed, equivalent, altered

        proven, equivalent, altered = tally()
        lacking = need - proven
        if lacking or deep:
            wanted = [e for e in src.entries if e.sha256 in lacking] if not deep else []
            await self._resolve(dst_name, final.entries, wanted, deep=deep)
            if deep:
                for d in final.entries:
                    known = held.get(d.uid)
                    if known is not None and known.stored == d.sha256:
                        proof_of[d.uid] = known  # the bytes are still those read back
                        d.sha256 = known.source
            proven, equivalent, altered = tally()
            lacking = need - proven
        consumed.update(need - lacking)
        changed = lacking & altered
        report.altered = sum(changed.values())
        report.equivalent = sum((need & equivalent).values())
        report.alteration = report.example = ""
        if changed:
            first = next(proof_of[d.uid] for d in final.entries
                         if d.uid in proof_of and d.sha256 in changed
                         and self._effective(proof_of[d.uid].proof or "").startswith("altered:"))
            report.alteration = self._effective(first.proof or "")
            report.example = first.note
        report.missing = sum((lacking - altered).values()) + unknown_source
        return final.state


def _real_folders(folders: list[Folder]) -> list[Folder]:
    """The source folders a copy goes over: \\All, \\Flagged, \\Important show messages kept
    in other folders (a Gmail source shows its labels instead: `gmail.py`)."""
    return [f for f in folders if f.special_use not in VIRTUAL_USES]


@dataclass(frozen=True)
class Held:
    """What a target UID holds, as its read-back proved: a copy of source message `source`
    whose stored bytes hash to `stored`, and the proof kind (see `rewrites.judge`)."""

    source: str
    stored: str | None
    proof: str | None
    note: str = ""
    validity: str | None = None  # the target UIDVALIDITY of a UID read back in this pass
    size: int | None = None  # the source message's listed size, as the manifest recorded it


def body_hash(data: bytes) -> str:
    """The content hash of fetched bytes (a `Digest` was hashed as it streamed in)."""
    return data.sha256 if isinstance(data, Digest) else content_hash(data)
