"""Address arithmetic fed needs: comparison keys, validation and physical addresses.

Mail systems compare addresses in two halves (RFC 5321 2.4): the domain is
case-insensitive, the local part belongs to the receiving system, which in practice
(Postfix, Dovecot, Exchange) matches it case-insensitively while keeping what the sender
wrote. fed does the same:

- ``address_key`` is the form every lookup uses: the directory, the holds, the queue
  rows of local recipients. Domain lowercased; local part lowercased too, unless the hub
  runs with case-sensitive local parts (``set_case_sensitive_local``, ``fed serve
  --case-sensitive-local``), for systems that really distinguish ``Jean`` from ``jean``.
- ``preserve`` keeps the local part as written and only lowercases the domain: the form
  fed passes on for mail it relays to a domain it does not serve, where the remote system
  decides what case means.

fed routes on *physical addresses* (``<mailbox id>@<system>.invalid``, see DESIGN.md and
``reconciler/drivers/base.py``). The format is the contract between fed and the reconciler;
fed must not import the reconciler (it is a separate server, like the patent's FED), so the
helpers are repeated here on purpose.
"""

from __future__ import annotations

import re

PHYSICAL_TLD = "invalid"

# Deliberately strict: what a directory key or an envelope recipient may look like.
# No spaces, no angle brackets, no control characters, exactly one "@".
# The domain may hold non-ASCII letters (an SMTPUTF8 U-label); whether a client may send
# non-ASCII at all is the SMTP layer's check (``server.address_refusal``).
_ADDRESS = re.compile(r"^[^@\s<>()\[\]\\,;:\"\x00-\x1f\x7f]+@[a-z0-9.\-_\u0080-\U0010ffff]+$")
# NUL, other C0 controls, DEL and lone surrogates (invalid UTF-8 decoded with
# surrogateescape by aiosmtpd): never part of an address, whatever the extensions.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

_case_sensitive_local = False


def set_case_sensitive_local(flag: bool) -> None:
    """Choose, once at start-up, whether local parts are compared case-sensitively."""
    global _case_sensitive_local
    _case_sensitive_local = flag


def case_sensitive_local() -> bool:
    """True if local parts are compared case-sensitively."""
    return _case_sensitive_local


def _unbracket(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def preserve(address: str) -> str:
    """The address unbracketed, domain lowercased, local part as written."""
    local, at, domain = _unbracket(address).rpartition("@")
    return f"{local}@{domain.lower()}" if at else domain.lower()


def address_key(address: str) -> str:
    """The comparison key of an address: what the directory, holds and queue look up."""
    local, at, domain = _unbracket(address).rpartition("@")
    if not at:
        return domain if _case_sensitive_local else domain.lower()
    if not _case_sensitive_local:
        local = local.lower()
    return f"{local}@{domain.lower()}"


# The historical name: every caller of normalize wants the lookup key.
normalize = address_key


def is_valid(address: str) -> bool:
    """True for a syntactically acceptable address (key or preserved form)."""
    local, _, domain = address.rpartition("@")
    return bool(_ADDRESS.match(f"{local}@{domain.lower()}")) and len(address) <= 320


def has_forbidden(address: str) -> bool:
    """True if the address holds NUL, control characters or invalid UTF-8."""
    return bool(_FORBIDDEN.search(address))


def domain_of(address: str) -> str:
    """The domain part of an address, lowercased ('' if none)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def split_physical(address: str) -> tuple[str, str] | None:
    """(system, mailbox id) of a physical address, or None for any other address."""
    local, _, domain = address.lower().rpartition("@")
    suffix = "." + PHYSICAL_TLD
    if not local or not domain.endswith(suffix) or len(domain) == len(suffix):
        return None
    return domain[: -len(suffix)], local
