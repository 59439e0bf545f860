"""PURE: what the mover knows about IMAP server families, learnt from the real servers.

Why a table: RFC 3501 leaves room, and servers use it. What the mover relies on is
either in every server (then it is not in this table) or checked per connection (the
capabilities); this table records what was *observed* on each family, so that a warning
can name the family and an admin reading docs/data-mover.md knows what to expect. The
mover's behaviour does not branch on it: its pipelining rules hold for every server (RFC
3501 5.5: nothing behind LOGIN/AUTHENTICATE/STARTTLS/SELECT/EXAMINE until it completes;
a protocol error stops pipelining). `tests/test_mover_servers.py` checks every row against
the private Dovecot and Cyrus the suite runs, so the table cannot drift from the servers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerFamily:
    """What one family of IMAP servers was seen to do (Debian bookworm's packages)."""

    name: str
    greeting: re.Pattern[bytes]  # how its greeting names it
    capabilities: frozenset[str]  # offered after login, of those the mover uses
    login_capabilities: frozenset[str]  # offered before login (the greeting)
    capabilities_in_greeting: bool  # `* OK [CAPABILITY ...]`: no CAPABILITY round trip
    capabilities_in_login_ok: bool  # the login's tagged OK carries the new capabilities
    behind_authenticate: str  # what it does with a command pipelined behind AUTHENTICATE
    separator: str  # hierarchy separator, default configuration
    personal_prefix: str  # personal namespace prefix, default configuration
    other_users_prefix: str | None  # where other users' shared folders appear in LIST
    admin_login: str  # how an admin reads a user's mailbox
    rewrites_on_store: str | None  # `rewrites.REWRITES` name, default configuration


# Capabilities the mover uses when offered: after login, and before it.
USED = frozenset({"LITERAL+", "MULTIAPPEND", "UIDPLUS", "NAMESPACE", "SPECIAL-USE",
                  "LIST-STATUS", "UNSELECT"})
USED_AT_LOGIN = frozenset({"SASL-IR", "AUTH=PLAIN"})

DOVECOT = ServerFamily(
    name="dovecot",
    greeting=re.compile(rb"Dovecot"),
    capabilities=USED,
    login_capabilities=USED_AT_LOGIN,
    capabilities_in_greeting=True,
    capabilities_in_login_ok=True,
    behind_authenticate="runs it once logged in",
    separator="/",  # as tests/dovecot.py configures it (Maildir++ default: ".")
    personal_prefix="",
    other_users_prefix=None,
    admin_login="master user: SASL PLAIN with the user as authorization id",
    rewrites_on_store=None,
)

CYRUS = ServerFamily(
    name="cyrus",
    greeting=re.compile(rb"Cyrus IMAP"),
    capabilities=USED,
    login_capabilities=USED_AT_LOGIN,
    capabilities_in_greeting=True,
    capabilities_in_login_ok=True,
    # 3.6.1: the AUTHENTICATE's tag answered OK, then (sometimes) BAD "Already
    # authenticated" under the same tag, and the commands behind the login never answered
    behind_authenticate="loses them (sometimes a BAD under the login's tag first)",
    separator=".",
    personal_prefix="INBOX.",
    other_users_prefix="user.",
    admin_login="admin (imapd.conf admins/proxyservers): SASL PLAIN with the user as "
                "authorization id",
    rewrites_on_store="8bit-headers-as-x",  # munge8bit: yes
)

FAMILIES = (DOVECOT, CYRUS)


def family_of(greeting: bytes) -> ServerFamily | None:
    """The family a greeting names, or None for a server not in the table."""
    return next((f for f in FAMILIES if f.greeting.search(greeting)), None)
