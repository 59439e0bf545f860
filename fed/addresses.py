"""Address arithmetic fed needs: normalisation and physical addresses.

fed routes on *physical addresses* (``<mailbox id>@<system>.invalid``, see DESIGN.md and
``reconciler/drivers/base.py``). The format is the contract between fed and the reconciler;
fed must not import the reconciler (it is a separate server, like the patent's FED), so the
two tiny helpers are repeated here on purpose. Addresses are compared case-insensitively:
every address entering fed, through SMTP or the control API, is lowercased here first, so
that the directory, the holds and the spool never disagree about ``Jean@Corp.example``.
"""

from __future__ import annotations

import re

PHYSICAL_TLD = "invalid"

# Deliberately strict: what a directory key or an envelope recipient may look like.
# No spaces, no angle brackets, no control characters, exactly one "@".
_ADDRESS = re.compile(r"^[^@\s<>()\[\]\\,;:\"\x00-\x1f\x7f]+@[a-z0-9.\-_]+$")


def normalize(address: str) -> str:
    """The canonical (lowercased, stripped, unbracketed) form of an address."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address.lower()


def is_valid(address: str) -> bool:
    """True for a syntactically acceptable, already normalised address."""
    return bool(_ADDRESS.match(address)) and len(address) <= 320


def domain_of(address: str) -> str:
    """The domain part of a normalised address ('' if none)."""
    return address.rpartition("@")[2] if "@" in address else ""


def split_physical(address: str) -> tuple[str, str] | None:
    """(system, mailbox id) of a physical address, or None for any other address."""
    local, _, domain = address.lower().rpartition("@")
    suffix = "." + PHYSICAL_TLD
    if not local or not domain.endswith(suffix) or len(domain) == len(suffix):
        return None
    return domain[: -len(suffix)], local
