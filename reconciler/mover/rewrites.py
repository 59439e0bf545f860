"""PURE: what a target did to a message it stored, and which changes an admin accepted.

Why: the mover's proof is the hash of the bytes the *target* returns for the UID it gave
(read back once after the APPEND), compared with the hash of the source's bytes. Some
servers change what they store: Cyrus replaces every 8-bit byte of the header with 'X'
(`munge8bit: yes`, its default), Exchange converts MIME, a virus scanner or a server may add
header lines. Such a copy is not the source message, so it is never a proof by itself: the
migration waits, the report names the target, the count and an example of the change, and
the admin either fixes the server or accepts, in the policy, a named equivalence from the
closed list below (`acceptStoreRewrites`). The proof then checks that the target holds
exactly the source's bytes *after that rewrite* (the hash of `rewrite(source)` equals the
hash read back) and says so ("equivalent: 8bit-headers-as-x"), so nothing else may differ.

Only rewrites that can be reproduced byte for byte from the source are in the list: an
equivalence that cannot be recomputed ("Exchange changed the MIME structure somehow") would
accept anything, which is no proof.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IDENTICAL = "identical"
CR = b"\r"


@dataclass(frozen=True)
class Rewrite:
    """A change some target makes on store that can be recomputed from the source bytes."""

    name: str  # as written in the policy
    description: str  # what the report says the target did
    hint: str  # how to stop the server from doing it
    apply: Callable[[bytes], bytes]


def header_end(data: bytes) -> int:
    """Where the header section ends (after its blank line), or the whole message."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    end = data.find(b"\n\n")
    return end + 2 if end >= 0 else len(data)


_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def eight_bit_headers_as_x(data: bytes) -> bytes:
    """Cyrus's munge8bit: each byte >= 0x80 of the top-level header becomes 'X' (the
    length is kept, the body and MIME part headers are left alone: observed on Cyrus
    3.6.1)."""
    end = header_end(data)
    head = data[:end]
    if not _EIGHT_BIT.search(head):
        return data
    return _EIGHT_BIT.sub(b"X", head) + data[end:]


REWRITES: dict[str, Rewrite] = {r.name: r for r in (
    Rewrite("8bit-headers-as-x", "8-bit header bytes replaced",
            "Cyrus: set 'munge8bit: no' in imapd.conf", eight_bit_headers_as_x),
)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def equivalent_hashes(data: bytes, names: frozenset[str] | set[str]) -> dict[str, str]:
    """{hash of rewrite(data): rewrite name} for the named rewrites that change `data`."""
    result: dict[str, str] = {}
    for name in sorted(names):
        rewrite = REWRITES.get(name)
        if rewrite is None:
            continue
        changed = rewrite.apply(data)
        if changed != data:
            result.setdefault(sha256(changed), name)
    return result


@dataclass(frozen=True)
class Judgement:
    """What the read-back says about one copy."""

    proof: str  # "identical", "equivalent:NAME", or "altered:NAME|other"
    note: str = ""  # for an altered copy: an example of the change

    @property
    def proven(self) -> bool:
        return self.proof == IDENTICAL or self.proof.startswith("equivalent:")

    @property
    def altered(self) -> bool:
        return self.proof.startswith("altered:")


class StreamedRewrites:
    """`equivalent_hashes` of a message that is never held whole (it streams from the source
    into the target): fed the message's wire form chunk by chunk. Why it can: every rewrite
    in `REWRITES` changes the top-level header only and keeps the length, so once the
    header's end is seen, rewrite(header) followed by the rest hashes like rewrite(message).
    A header not ended within `limit` bytes gives no equivalence (such a copy is reported
    altered, never proven by a guess)."""

    def __init__(self, limit: int = 1 << 18) -> None:
        self.limit = limit
        self._head = bytearray()
        self._digests: dict[str, Any] | None = None  # name -> sha256 of rewrite(message)

    def update(self, wire_chunk: bytes) -> None:
        if self._digests is not None:
            for digest in self._digests.values():
                digest.update(wire_chunk)
            return
        self._head += wire_chunk
        if b"\r\n\r\n" in self._head or b"\n\n" in self._head:
            self._start(bytes(self._head))
        elif len(self._head) > self.limit:
            self._digests, self._head = {}, bytearray()

    def _start(self, head: bytes) -> None:
        self._digests, self._head = {}, bytearray()
        for name in sorted(REWRITES):
            changed = REWRITES[name].apply(head)
            if changed != head:
                self._digests[name] = hashlib.sha256(changed)

    def hashes(self) -> dict[str, str]:
        """{hash of rewrite(message): rewrite name}, as `equivalent_hashes` gives it."""
        if self._digests is None:  # the message ended inside its header: it all is header
            self._start(bytes(self._head))
        assert self._digests is not None
        result: dict[str, str] = {}
        for name, digest in self._digests.items():
            result.setdefault(digest.hexdigest(), name)
        return result


def judge(source_sha: str, sent: bytes | None, stored_sha: str, stored: bytes | None,
          accepted: frozenset[str] | set[str], *,
          alternatives: dict[str, str] | None = None) -> Judgement:
    """Compare the source's hash with the hash the target's bytes gave. `sent`/`stored` are
    the bytes when at hand (for the equivalences and the example), None when a big message
    was only hashed as it streamed by; `alternatives` are the equivalences of a message
    that was streamed (`StreamedRewrites.hashes`)."""
    if stored_sha == source_sha:
        return Judgement(IDENTICAL)
    if sent is None and alternatives is None:
        return Judgement("altered:other", "content differs (a large message: no example)")
    known = equivalent_hashes(sent, set(REWRITES)) if sent is not None else alternatives or {}
    if sent is None:
        for digest, name in known.items():
            if digest == stored_sha:
                if name in accepted:
                    return Judgement(f"equivalent:{name}")
                return Judgement(f"altered:{name}", "(a large message: no example)")
        return Judgement("altered:other", "content differs (a large message: no example)")
    for digest, name in known.items():
        if digest == stored_sha:
            if name in accepted:
                return Judgement(f"equivalent:{name}")
            return Judgement(f"altered:{name}", example(sent, stored))
    return Judgement("altered:other", example(sent, stored))


def describe(proof: str) -> str:
    """The words of a proof kind: "8-bit header bytes replaced", "content changed"."""
    _, _, name = proof.partition(":")
    rewrite = REWRITES.get(name)
    return rewrite.description if rewrite is not None else "content changed"


def hint(proof: str) -> str:
    """How to stop the server from doing it, when known."""
    _, _, name = proof.partition(":")
    rewrite = REWRITES.get(name)
    return rewrite.hint if rewrite is not None else ""


def _show(line: bytes, limit: int = 80) -> str:
    text = line.decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "..."


def example(sent: bytes, stored: bytes | None) -> str:
    """The first line that differs, as sent and as stored (escaped, shortened); which part
    of the message it is in. Header lines of mail are what an admin needs to see here; the
    body is named, not shown."""
    if stored is None:
        return "content differs"
    a, b = sent.split(b"\n"), stored.split(b"\n")
    head = header_end(sent)
    offset = 0
    for i in range(max(len(a), len(b))):
        left = a[i] if i < len(a) else None
        right = b[i] if i < len(b) else None
        if left != right:
            if offset >= head:
                return f"body changed from line {i + 1}"
            before = _show((left or b"").rstrip(CR))
            after = _show((right or b"").rstrip(CR))
            if left is None:
                return f"line {i + 1} added: {after!r}"
            if right is None:
                return f"line {i + 1} removed: {before!r}"
            return f"{before!r} stored as {after!r}"
        offset += len(left or b"") + 1
    return "content differs"
