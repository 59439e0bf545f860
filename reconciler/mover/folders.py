"""Folder names across systems: separators, namespaces, special-use folders, the policy's map.

Why one canonical form: a source may call the sent folder ``INBOX.Sent`` (Courier-style
namespace, ``.`` separator), the target ``Sent`` with ``/``, an Exchange server
``Sent Items``, a French mailbox ``Éléments envoyés``. The mover reasons on *canonical*
names, Unicode with ``/`` as the hierarchy separator and no namespace prefix (``INBOX``
stays ``INBOX``), and each endpoint translates to and from its own wire form. The embedded
maildir system's names are already canonical.

The target folder of a source folder is decided in this order, first match wins:

1. a `folderMap` rule of the policy, ``{from: "INBOX.Sent", to: "Sent"}``; ``from`` is the
   source's own name (its separator) or canonical name; a trailing ``*`` matches a prefix
   and the rest replaces the ``*`` of ``to`` (``{from: "Archives/*", to: "Archive/*"}``);
2. the special use (RFC 6154 ``\\Sent``, or a well-known name when the server does not
   advertise it) mapped to the target's folder of the same use; a provider's nested
   folder of a use the target lacks (``[Gmail]/Spam``, ``\\Junk``) goes to the
   conventional name (``Junk``); folders of messages kept elsewhere (``\\All``,
   ``\\Flagged``, Gmail's ``\\Important``) are not copied (`VIRTUAL_USES`);
3. the canonical name itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SPECIAL_USES = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive")
# Folders that show messages kept elsewhere (RFC 6154 \\All and \\Flagged, Gmail's
# \\Important): never copied as folders, or every message would land twice.
VIRTUAL_USES = ("\\All", "\\Flagged", "\\Important")
# The attributes a LIST may carry, by their lower-case spelling
ATTRIBUTES = {use.lower(): use for use in SPECIAL_USES + VIRTUAL_USES}
# Where a provider's own folder of a use goes on a target that has none of that use
CONVENTIONAL = {"\\Sent": "Sent", "\\Drafts": "Drafts", "\\Trash": "Trash", "\\Junk": "Junk",
                "\\Archive": "Archive"}

# Names clients and servers commonly give special folders, for servers without SPECIAL-USE
# (and for the embedded maildir system, which has no attributes at all). Lower case.
_WELL_KNOWN: dict[str, str] = {}
for _use, _names in {
    "\\Sent": ("sent", "sent items", "sent messages", "sent mail", "éléments envoyés",
               "envoyés", "gesendet", "gesendete elemente", "enviados", "inviata"),
    "\\Drafts": ("drafts", "brouillons", "entwürfe", "borradores", "bozze"),
    "\\Trash": ("trash", "deleted items", "deleted messages", "corbeille",
                "éléments supprimés", "papierkorb", "papelera", "cestino", "bin"),
    "\\Junk": ("junk", "spam", "junk e-mail", "junk email", "courrier indésirable"),
    "\\Archive": ("archive", "archives", "archiv"),
}.items():
    for _name in _names:
        _WELL_KNOWN[_name] = _use


@dataclass(frozen=True)
class FolderRule:
    """One `folderMap` entry of the policy."""

    source: str
    target: str


@dataclass(frozen=True)
class Folder:
    """A folder as an endpoint lists it: canonical name, native name, special use."""

    name: str  # canonical
    native: str  # as the endpoint shows it, decoded (its separator, its prefix)
    special_use: str | None = None
    selectable: bool = True


def guess_special_use(name: str) -> str | None:
    """The special use a well-known top-level name implies (``Sent Items`` -> \\Sent)."""
    return _WELL_KNOWN.get(name.rsplit("/", 1)[-1].lower()) if "/" not in name else None


def canonical(native: str, separator: str | None, prefix: str = "") -> str:
    """The canonical name of a native (decoded) name."""
    if native.upper() == "INBOX":
        return "INBOX"
    name = native[len(prefix):] if prefix and native.startswith(prefix) else native
    if separator and separator != "/":
        name = name.replace(separator, "/")
    return name


def native(name: str, separator: str | None, prefix: str = "") -> str:
    """The native (decoded) name of a canonical name on an endpoint."""
    if name.upper() == "INBOX":
        return "INBOX"
    text = name.replace("/", separator) if separator and separator != "/" else name
    return prefix + text


def _rule_target(rule: FolderRule, names: Iterable[str]) -> str | None:
    for name in names:
        if rule.source.endswith("*"):
            head = rule.source[:-1]
            if name.startswith(head) and name != head.rstrip("/."):
                rest = name[len(head):]
                return rule.target.replace("*", rest) if "*" in rule.target else rule.target
        elif name == rule.source:
            return rule.target
    return None


def ruled(name: str, native_name: str, rules: Iterable[FolderRule]) -> bool:
    """Whether a folderMap rule decides this folder's target."""
    return any(_rule_target(r, (native_name, name)) is not None for r in rules)


def map_folders(
    source: Iterable[Folder], target: Iterable[Folder], rules: Iterable[FolderRule] = (),
    source_separator: str | None = "/",
) -> dict[str, str]:
    """Canonical source name -> canonical target name, for every selectable source folder."""
    source = list(source)
    target = list(target)
    # Map by use only when it is unambiguous on both sides (one Sent folder each).
    src_uses = Counter(f.special_use for f in source if f.special_use and f.selectable)
    dst_uses = Counter(f.special_use for f in target if f.special_use)
    by_use: Mapping[str, str] = {f.special_use: f.name for f in target
                                 if f.special_use and dst_uses[f.special_use] == 1}
    result: dict[str, str] = {}
    rules = list(rules)
    for folder in source:
        if not folder.selectable:
            continue
        chosen: str | None = None
        for rule in rules:
            chosen = _rule_target(rule, (folder.native, folder.name))
            if chosen is not None:
                if "*" in rule.source and source_separator and source_separator != "/":
                    chosen = chosen.replace(source_separator, "/")
                break
        if chosen is None and folder.special_use and src_uses[folder.special_use] == 1:
            if folder.special_use in by_use:
                chosen = by_use[folder.special_use]
            elif "/" in folder.name and folder.special_use in CONVENTIONAL:
                # A provider's folder by its attribute (`[Gmail]/Spam` is \\Junk): the
                # target's conventional name, not the provider's path.
                chosen = CONVENTIONAL[folder.special_use]
        result[folder.name] = chosen or folder.name
    return result
