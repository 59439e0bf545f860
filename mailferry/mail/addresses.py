"""Addresses, the one parser: access addresses, physical addresses, comparison keys, IDN.

Every part of mailferry reads addresses (fed routes on them, the reconciler plans on them,
the drivers store them), and each used to carry its own split: two of them disagreed on
``x@.invalid``. This module is the one copy; it is pure (no I/O).

Vocabulary (DESIGN.md):

- an *access address* (AD1) is what outsiders write to, ``jean.dupont@corp.example``;
- a *physical address* (ADP) is where a mailbox really is, written as an address so that
  fed can route to it: ``<mailbox id>@<system>.invalid`` (the ``.invalid`` TLD, RFC 2606,
  never leaks to the outside world);
- the *mailbox id* mailferry gives the mailbox of an access address is
  ``jean.dupont=corp.example``.

``x@.invalid`` is not a physical address: its domain ``.invalid`` has an empty first label,
which RFC 5321 4.1.2's ``Domain = sub-domain *("." sub-domain)`` does not allow, and a
physical address names a *system*, which an empty string does not. Both fed and the
reconciler now refuse it (``split_physical`` returns None).

Comparison (RFC 5321 2.4): the domain is case-insensitive, the local part belongs to the
receiving system, which in practice (Postfix, Dovecot, Exchange) matches it
case-insensitively while keeping what the sender wrote. ``address_key`` is the form every
lookup uses (domain lowercased; local part lowercased too unless the process runs with
case-sensitive local parts, ``set_case_sensitive_local``: fed's ``--case-sensitive-local``);
``preserve`` keeps the local part as written and only lowercases the domain.

IDN: a domain may be written with U-labels (``bücher.example``) or A-labels
(``xn--bcher-kva.example``, RFC 5890): one domain, two spellings. ``parse`` gives both forms
(IDNA 2008 with UTS 46 mapping, the ``idna`` package; never hand-written punycode) and
``address_key`` -- the form every lookup uses -- writes the domain with A-labels, so that
fed's directory, its holds and queue, the reconciler's specs and the drivers find an address
whichever form a sender or an admin wrote. A-labels rather than U-labels because the key
then needs SMTPUTF8 only for what has no ASCII form: a mailbox id
(``jean=xn--bcher-kva.example``) and its physical address stay ASCII when only the domain
is international. A UTF-8 local part (RFC 6531, ``jürgen@corp.example``) has no ASCII form;
the key keeps it, in Unicode NFC (one spelling of ``ü``) and lowercased unless local parts
are case-sensitive. A non-ASCII domain that is not a valid IDN keeps its lowercased
spelling in the key: it matches nothing the directory holds (``check`` refuses it there).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import idna

PHYSICAL_TLD = "invalid"
MAX_LENGTH = 320  # RFC 3696 errata: 64 for the local part + "@" + 255 for the domain

# Deliberately strict: what a directory key or an envelope recipient may look like.
# No spaces, no angle brackets, no control characters, exactly one "@" (the last one).
# The domain may hold non-ASCII letters (an SMTPUTF8 U-label).
_ADDRESS = re.compile(r"^[^@\s<>()\[\]\\,;:\"\x00-\x1f\x7f]+@[a-z0-9.\-_\u0080-\U0010ffff]+$")
# NUL, other C0 controls, DEL and lone surrogates (invalid UTF-8 decoded with
# surrogateescape by aiosmtpd): never part of an address, whatever the extensions.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

_case_sensitive_local = False


class AddressError(ValueError):
    """Text that is not an address this module accepts (the message says why)."""


@dataclass(frozen=True)
class Address:
    """A parsed address: the local part as written, the domain in both IDN forms."""

    local: str
    domain: str  # lowercased, as written (U-labels stay U-labels)
    domain_ascii: str  # A-labels (RFC 5890); equal to `domain` for an ASCII domain

    @property
    def domain_unicode(self) -> str:
        """The domain with U-labels (what a person reads)."""
        return domain_to_unicode(self.domain_ascii)

    @property
    def is_ascii(self) -> bool:
        """True when neither half needs SMTPUTF8."""
        return self.local.isascii() and self.domain.isascii()

    @property
    def physical(self) -> tuple[str, str] | None:
        """(system, mailbox id) when this is a physical address, else None."""
        return split_physical(f"{self.local}@{self.domain}")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def set_case_sensitive_local(flag: bool) -> None:
    """Choose, once at start-up, whether local parts are compared case-sensitively."""
    global _case_sensitive_local
    _case_sensitive_local = flag


def case_sensitive_local() -> bool:
    """True if local parts are compared case-sensitively."""
    return _case_sensitive_local


def unbracket(address: str) -> str:
    """``<a@b>`` -> ``a@b`` (surrounding white space dropped too)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def domain_to_ascii(domain: str) -> str:
    """The A-label form of a domain (lowercased); AddressError for a bad IDN.

    An ASCII domain is only lowercased: IDNA would refuse the underscores and other
    characters that real (internal) domains and fed's directory keys hold."""
    domain = domain.lower()
    if domain.isascii():
        return domain
    return _to_a_labels(domain)


@functools.lru_cache(maxsize=4096)
def _to_a_labels(domain: str) -> str:
    """IDNA 2008 + UTS 46 (about 18 us a call): cached, a mail system has few domains and
    fed converts one on every RCPT that spells it in U-labels."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"domain {domain!r} is not a valid IDN: {exc}") from None


def domain_to_unicode(domain: str) -> str:
    """The U-label form of a domain (A-labels decoded; left as is when they do not decode)."""
    domain = domain.lower()
    if "xn--" not in domain:
        return domain
    return _to_u_labels(domain)


@functools.lru_cache(maxsize=4096)
def _to_u_labels(domain: str) -> str:
    try:
        return str(idna.decode(domain, uts46=True))
    except (idna.IDNAError, UnicodeError):
        return domain


def readable(address: str) -> str:
    """An address as a person reads it: its domain in U-labels (``jürgen@bücher.example``
    for the key ``jürgen@xn--bcher-kva.example``); what the text plan prints."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain_to_unicode(domain)}" if at and "xn--" in domain else address


def parse(address: str) -> Address:
    """The one parser: an address (bracketed or not) -> `Address`; AddressError if it is not
    one `is_valid` accepts, or its non-ASCII domain is not a valid IDN."""
    text = unbracket(address)
    if has_forbidden(text):
        raise AddressError(f"address {text!r} holds control characters or invalid UTF-8")
    if not is_valid(text):
        raise AddressError(f"{text!r} is not an address (local@domain)")
    local, _, domain = text.rpartition("@")
    return Address(local, domain.lower(), domain_to_ascii(domain))


def same_domain(a: str, b: str) -> bool:
    """True when two domains are one (case and IDN form aside)."""
    try:
        return domain_to_ascii(a) == domain_to_ascii(b)
    except AddressError:
        return a.lower() == b.lower()


def preserve(address: str) -> str:
    """The address unbracketed, domain lowercased, local part as written."""
    local, at, domain = unbracket(address).rpartition("@")
    return f"{local}@{domain.lower()}" if at else domain.lower()


def address_key(address: str) -> str:
    """The comparison key of an address: what the directory, holds and queue look up.

    Domain lowercased, with A-labels; local part in NFC, lowercased unless case-sensitive
    (see the module docstring). An ASCII address is the whole text lowercased: its domain's
    A-label form is its lowercase (`domain_to_ascii`), and so is its local part unless
    case-sensitive (the short way: 175,000 spec addresses are keyed at every load)."""
    if not _case_sensitive_local and address.isascii():
        return unbracket(address).lower()
    local, at, domain = unbracket(address).rpartition("@")
    if not at:
        return domain if _case_sensitive_local else domain.lower()
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    if not _case_sensitive_local:
        local = local.lower()
    return f"{local}@{domain_key(domain)}"


def domain_key(domain: str) -> str:
    """A domain as a key holds it: A-labels, or as written when it is no valid IDN."""
    try:
        return domain_to_ascii(domain)
    except AddressError:
        return domain.lower()


def ascii_form(address: str) -> str | None:
    """The address with its domain in A-labels, for a server without SMTPUTF8 (RFC 6531
    3.2); None when that is not enough: a UTF-8 local part has no ASCII form, and a
    non-ASCII domain that is no valid IDN has none either. ``""`` (the null sender) stays."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address if address.isascii() else None
    if not local.isascii():
        return None
    try:
        return f"{local}@{domain_to_ascii(domain)}"
    except AddressError:
        return None


def check(address: str) -> str:
    """The key of an address from a person or another system, AddressError (saying why)
    if it is none: what a spec or a directory entry may hold. A-labels must decode."""
    domain = parse(address).domain_ascii
    if "xn--" in domain:
        try:
            idna.decode(domain, uts46=True)
        except (idna.IDNAError, UnicodeError) as exc:
            raise AddressError(f"domain {domain!r} is not a valid IDN: {exc}") from None
    return address_key(address)


# The historical name: every caller of normalize wants the lookup key.
normalize = address_key


def is_valid(address: str) -> bool:
    """True for a syntactically acceptable address (key or preserved form)."""
    local, _, domain = address.rpartition("@")
    return bool(_ADDRESS.match(f"{local}@{domain.lower()}")) and len(address) <= MAX_LENGTH


def has_forbidden(address: str) -> bool:
    """True if the address holds NUL, control characters or invalid UTF-8."""
    return bool(_FORBIDDEN.search(address))


def domain_of(address: str) -> str:
    """The domain part of an address, lowercased ('' if none)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def mailbox_id_for(address: str) -> str:
    """The mailbox id mailferry gives the mailbox of an access address."""
    local, _, domain = address.lower().partition("@")
    return f"{local}={domain}" if domain else local


def address_of_mailbox(mailbox_id: str) -> str:
    """The access address a mailbox id was made from (`mailbox_id_for` backwards: the
    last ``=`` separates the domain, which never holds one)."""
    local, eq, domain = mailbox_id.rpartition("=")
    return f"{local}@{domain}" if eq and local else mailbox_id


def format_address(template: str, address: str) -> str:
    """`template` with ``{address}``, ``{local}`` and ``{domain}`` of `address` filled in:
    how a system that is not mailferry's names a mailbox (an IMAP login, the RCPT TO
    fed gives a hosted system for a physical address)."""
    local, _, domain = address.rpartition("@")
    return template.format(address=address, local=local, domain=domain)


def physical_address(system: str, mailbox_id: str) -> str:
    """ADP: the routable physical address of mailbox `mailbox_id` on `system`."""
    return f"{mailbox_id}@{system}.{PHYSICAL_TLD}"


def split_physical(address: str) -> tuple[str, str] | None:
    """(system, mailbox id) of a physical address, or None for any other address
    (``x@.invalid`` included: no system is named, see the module docstring)."""
    local, _, domain = address.lower().rpartition("@")
    system, dot, tld = domain.rpartition(".")
    if not local or not dot or tld != PHYSICAL_TLD or not system:
        return None
    return system, local
