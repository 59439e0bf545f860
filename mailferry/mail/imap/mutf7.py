"""IMAP's modified UTF-7 for mailbox names (RFC 3501 section 5.1.3): the one codec.

IMAP servers send and expect folder names such as ``&AMk-l&AOk-ments envoy&AOk-s``
(``Éléments envoyés``) on the wire, while the mover, the policy's folder map, the station
agent and the embedded maildir system speak Unicode. The codec is short; pulling a whole IMAP
library in for it would couple us to that library's versions. mailferry never sends
``ENABLE UTF8=ACCEPT`` (RFC 6855), so a server that offers it still speaks modified UTF-7
to us (RFC 6855 3: UTF-8 names only after the client enabled them); one that sends raw
UTF-8 anyway is read as it is (``decode`` leaves text without ``&`` alone).

``encode(name, also=".")`` also encodes the characters of `also` (printable ASCII that
standard mUTF-7 would leave as is): the maildir system encodes ".", its Maildir++ hierarchy
separator, as Dovecot does. ``decode`` reads any such name back, and returns text that is not
valid modified UTF-7 as it is rather than failing (a server's odd folder is still listed).
Characters outside the BMP travel as UTF-16 surrogate pairs, as the RFC says.
"""

from __future__ import annotations

import base64


def encode(name: str, also: str = "") -> str:
    """Unicode folder name -> modified UTF-7 (the characters of `also` encoded too)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=")
                       .replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E and char not in also:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode(name: str) -> str:
    """Modified UTF-7 -> Unicode (text that is not valid mUTF-7 is returned as is)."""
    out: list[str] = []
    i = 0
    while i < len(name):
        char = name[i]
        end = name.find("-", i) if char == "&" else -1
        if char != "&" or end < 0:
            out.append(char)
            i += 1
            continue
        chunk = name[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            data = chunk.replace(",", "/")
            try:
                out.append(base64.b64decode(data + "=" * (-len(data) % 4)).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(name[i:end + 1])
        i = end + 1
    return "".join(out)
