"""Learn an admin's Postfix + Dovecot system from the servers themselves (adoption).

Nothing here writes: it asks Dovecot for its users (``doveadm user '*'``, whatever the
userdb behind it: passwd-file, SQL, LDAP) and their homes, and Postfix for the maps its
``virtual_mailbox_maps`` and ``virtual_alias_maps`` name (``postmap -s`` for indexed files,
which can be listed; ``postmap -q -`` with the candidate addresses on stdin for SQL/LDAP
maps, which can only be asked: the Dovecot users' addresses, and for alias maps the keys
`pfdovecot_keys` finds in their database or the admin's list; Postfix's answer decides).
Every command goes through a `Runner`, so that the same code
reads a system on this host or on another one.

What comes out (`Learned`): one `AdminMailbox` per Dovecot user whose address Postfix
delivers (its access address, and the aliases that point at that one address only), the
list aliases (several targets: they stay the admin's and keep working through the overlay,
they are no mailbox's alias), and notes for what could not be read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from mailferry.mail.addresses import mailbox_id_for
from reconciler.errors import TemporaryError


class Runner(Protocol):
    """Run a command on the system's host: stdout, or a TemporaryError naming `what`."""

    def __call__(self, argv: list[str], what: str, *, stdin: str | None = None) -> str: ...


# Map types postmap -s can list (indexed files); every other type can only be asked (-q).
LISTABLE = frozenset({"hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash", "inline"})
BATCH = 500  # users per doveadm call: one process per batch, not per user


@dataclass(frozen=True)
class AdminMailbox:
    """One of the admin's mailboxes as the servers know it."""

    user: str  # the Dovecot user name (what the master user logs in as)
    address: str  # access address: what Postfix delivers to this user
    aliases: tuple[str, ...] = ()  # single-target aliases of `address` in the admin's maps
    home: str = ""

    @property
    def mailbox_id(self) -> str:
        return mailbox_id_for(self.address)


@dataclass
class Learned:
    """What adoption found on a system."""

    mailboxes: list[AdminMailbox] = field(default_factory=list)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)  # alias -> targets
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the admin should fix, with how


def split_list(value: str) -> list[str]:
    """A Postfix list parameter (commas and/or whitespace) -> its items."""
    return [item for item in value.replace(",", " ").split() if item]


def map_type(table: str) -> str:
    """`hash:/etc/postfix/virtual` -> `hash`; `proxy:sqlite:/x` -> `sqlite`."""
    kind = table.split(":", 1)[0] if ":" in table else ""
    if kind == "proxy":
        return map_type(table.split(":", 1)[1])
    return kind


def list_users(run: Runner, dovecot_config: str) -> list[str]:
    """Every user Dovecot's userdbs iterate (``doveadm user '*'``)."""
    out = run(["doveadm", "-c", dovecot_config, "user", "*"], "doveadm user '*'")
    return [line.strip() for line in out.splitlines() if line.strip()]


def homes(run: Runner, dovecot_config: str, users: list[str]) -> dict[str, str]:
    """user -> home, from ``doveadm user -f home`` in batches (one value block per user)."""
    found: dict[str, str] = {}
    for start in range(0, len(users), BATCH):
        batch = users[start:start + BATCH]
        out = run(["doveadm", "-c", dovecot_config, "user", "-f", "home", *batch],
                  "doveadm user -f home")
        values = out.rstrip("\n").split("\n\n")
        if len(values) != len(batch):  # not one block per user: ask one by one
            values = [run(["doveadm", "-c", dovecot_config, "user", "-f", "home", user],
                          "doveadm user -f home").strip() for user in batch]
        found.update(zip(batch, (v.strip() for v in values), strict=True))
    return found


def dump_map(run: Runner, postfix_dir: str, table: str) -> dict[str, str]:
    """Every key -> value of a listable map (``postmap -s``)."""
    out = run(["postmap", "-c", postfix_dir, "-s", table], f"postmap -s {table}")
    return _pairs(out)


def query_map(run: Runner, postfix_dir: str, table: str, keys: Iterable[str]) -> dict[str, str]:
    """key -> value for the keys a map answers (``postmap -q -``, keys on stdin)."""
    wanted = "".join(f"{k}\n" for k in sorted(set(keys)))
    if not wanted:
        return {}
    # postmap exits 1 both when no key is found and on a fatal error: the shell turns the
    # first into 0, and the second shows as postmap's own words in the merged output.
    out = run(["sh", "-c", 'postmap "$@" 2>&1; [ $? -le 1 ]', "postmap", "-c", postfix_dir,
               "-q", "-", table], f"postmap -q - {table}", stdin=wanted)
    said = [line for line in out.splitlines() if line.startswith("postmap: ")]
    if said:
        raise TemporaryError(f"postmap -q - {table}: {'; '.join(said)[:300]}")
    return _pairs(out)


def _pairs(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("\t") if "\t" in line else line.partition(" ")
        if key:
            found.setdefault(key.strip().lower(), value.strip())
    return found


def learn(run: Runner, *, postfix_dir: str, dovecot_config: str, domains: tuple[str, ...],
          mailbox_maps: list[str], alias_maps: list[str], skip: frozenset[str] = frozenset(),
          alias_keys: dict[str, set[str]] | None = None) -> Learned:
    """The admin's mailboxes: Dovecot's users whose address Postfix delivers.

    `skip`: tables that are mailferry's own overlay (never the admin's state).
    `alias_keys`: for alias maps that cannot be listed, the candidate keys to ask Postfix
    (`pfdovecot_keys`), besides the Dovecot users' addresses."""
    learned = Learned()
    users = list_users(run, dovecot_config)
    domain_set = {d.lower() for d in domains}
    candidates: dict[str, list[str]] = {}
    for user in users:
        if "=" in user and "@" not in user:
            continue  # a mailbox mailferry created (its overlay passwd-file)
        options = [user.lower()] if "@" in user else [f"{user}@{d}".lower() for d in domains]
        candidates[user] = [a for a in options if a.rsplit("@", 1)[1] in domain_set]
    every = {a for options in candidates.values() for a in options}
    delivered: set[str] = set()
    for table in mailbox_maps:
        if table in skip:
            continue
        if map_type(table) in LISTABLE:
            delivered |= set(dump_map(run, postfix_dir, table))
        else:
            delivered |= set(query_map(run, postfix_dir, table, every))
    aliases: dict[str, str] = {}
    for table in alias_maps:
        if table in skip:
            continue
        if map_type(table) in LISTABLE:
            for key, value in dump_map(run, postfix_dir, table).items():
                aliases.setdefault(key, value)
        else:  # Postfix answers for each candidate: its answer decides, not our reading
            keys = every | (alias_keys or {}).get(table, set())
            for key, value in query_map(run, postfix_dir, table, keys).items():
                aliases.setdefault(key, value)
    homes_of = homes(run, dovecot_config, list(candidates))
    by_address: dict[str, AdminMailbox] = {}
    for user, options in candidates.items():
        address = next((a for a in options if a in delivered), None)
        if address is None:
            learned.notes.append(f"Dovecot user {user}: no address of {', '.join(domains)} "
                                 "that Postfix delivers; left alone")
            continue
        by_address[address] = AdminMailbox(user, address, home=homes_of.get(user, ""))
    single: dict[str, list[str]] = {}
    for alias, value in sorted(aliases.items()):
        if alias.startswith("@"):
            learned.notes.append(f"catch-all {alias} -> {value} in the admin's aliases: kept "
                                 "as it is")
            continue
        targets = tuple(t.lower() for t in split_list(value))
        if len(targets) == 1 and targets[0] in by_address and alias != targets[0]:
            single.setdefault(targets[0], []).append(alias)
        elif alias not in by_address:
            learned.lists[alias] = targets
    learned.mailboxes = sorted(
        (AdminMailbox(m.user, m.address, tuple(sorted(single.get(m.address, []))), m.home)
         for m in by_address.values()), key=lambda m: m.address)
    return learned
