"""The directory DIR: which physical address each access address routes to, and the systems.

The patent's routing center FED keeps a directory, fed by the systems' up-syncs and moved
by exactly one operation during a migration: the flip (E9). This module is that directory,
with the rules that make a migration safe:

- *Up-sync never steals.* A system may add addresses nobody routes yet and withdraw its
  own, but an address routed to another system's mailbox stays there: only the flip moves
  an address between systems, and the flip is what the reconciler does under a hold.
- *Flip is all or nothing.* Every address must currently be at ``from`` (or already at
  ``to``); one at a third place aborts the whole flip, so a half-moved alias set never
  exists.
- *Down-sync is versioned.* Every change bumps one counter, so a system (or the
  reconciler) can tell whether its address book is current.

Where it lives: in the shared database (``shared_db.py``) that every fed node reads, so a
flip made through one node routes mail on all of them. Reading it must not cost a query
per message: ``lookup`` and ``system`` answer from an in-memory copy that ``node_agent.py``
reloads when the version counters move. A node's own writes are applied to its copy at
once (a ``PUT`` is visible to the next RCPT on that node); other nodes see them at their
next refresh, which is what the hold protocol (docs/fed-multinode.md) relies on.

Every method validates its input, raising ``DirectoryError`` with a message meant for the
API caller. Call them from the event loop thread (the copy is not locked).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, insert, select, update

from mailferry.mail.addresses import (
    AddressError,
    address_of_mailbox,
    check,
    format_address,
    is_valid,
    split_physical,
)
from mailferry.mail.tls import MODES as TLS_MODES

from . import shared_db as t
from .shared_db import SharedDB, bump, counters

PROTOCOLS = ("lmtp", "smtp")


class DirectoryError(Exception):
    """Invalid request (HTTP 400)."""


class DirectoryConflict(DirectoryError):
    """The request contradicts the current directory (HTTP 409)."""


@dataclass(frozen=True)
class System:
    """A registered mail system and where fed delivers its physical addresses."""

    name: str
    host: str
    port: int
    protocol: str
    # Bumped by a refresh: connections opened under an older generation are retired.
    generation: int = 0
    tls: str = "none"  # "starttls" (required) or "implicit": the certificate verified
    cafile: str | None = None  # the CA that signed its certificate (None: system roots)
    auth_user: str | None = None  # SMTP AUTH as this user (a hosted system's submission)
    auth_file: str | None = None  # ... with the password in this file (read at each login)
    rcpt: str = ""  # RCPT TO: "" the physical address, else a format of the access address

    def recipient(self, physical: str) -> str:
        """What fed sends as RCPT TO for one of this system's physical addresses: the
        physical address itself (systems mailferry administers route it), or, for a system
        that knows its mailboxes only by their addresses (a hosted target), the mailbox's
        access address through the `rcpt` format ("{address}", "{local}@tenant.example")."""
        if not self.rcpt:
            return physical
        return format_address(self.rcpt, address_of_mailbox(physical.rpartition("@")[0]))


@dataclass
class UpsyncResult:
    """What an up-sync changed in the directory."""

    added: dict[str, str] = field(default_factory=dict)
    updated: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    conflicts: list[dict[str, str]] = field(default_factory=list)


@dataclass
class FlipResult:
    """Per address: moved now, already at the target, or created at the target."""

    flipped: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)


def check_address(raw: object, what: str = "address") -> str:
    """Normalise and validate an address coming from outside: its key, so that both forms
    of an IDN domain (``bücher.example``, ``xn--bcher-kva.example``) are one entry."""
    if not isinstance(raw, str):
        raise DirectoryError(f"{what} must be a string, got {raw!r}")
    try:
        return check(raw)
    except AddressError as exc:
        raise DirectoryError(f"{what} {raw!r} is not a valid address: {exc}") from None


def check_physical(raw: object, what: str = "physical") -> str:
    """Normalise and validate a physical address (``<id>@<system>.invalid``)."""
    address = check_address(raw, what)
    if split_physical(address) is None:
        raise DirectoryError(f"{what} {raw!r} is not a physical address (<id>@<system>.invalid)")
    return address


@dataclass
class Snapshot:
    """What a node loads from the shared database: counters and, if they moved, data."""

    counters: dict[str, int]
    entries: dict[str, str] | None = None
    systems: dict[str, System] | None = None
    holds: list[tuple[str, str, float]] | None = None


class Directory:
    """Directory entries, systems registry, up-sync state, in the shared database."""

    def __init__(self, shared: SharedDB) -> None:
        self.shared = shared
        self._entries: dict[str, str] = {}
        self._systems: dict[str, System] = {}
        self.loaded: tuple[int, int] = (-1, -1)  # (directory, systems) versions in the copy
        # This node's own writes, with the version each produced: applied to the copy at
        # once, and again over any reload read before they committed.
        self._own: list[tuple[int, str, str | None]] = []
        self._own_systems: list[tuple[int, System]] = []

    # -- the in-memory copy ---------------------------------------------------------
    def load(self, snapshot: Snapshot) -> None:
        """Replace the copy with what was read (on the loop), keeping own newer writes."""
        version, systems = snapshot.counters["version"], snapshot.counters["systems_version"]
        # Counters only grow: never replace the copy with an older one.
        if snapshot.entries is not None and version >= self.loaded[0]:
            entries = dict(snapshot.entries)
            for produced, address, physical in self._own:
                if produced > version:  # committed after this snapshot was read
                    _change(entries, address, physical)
            self._entries = entries
        if snapshot.systems is not None and systems >= self.loaded[1]:
            by_name = dict(snapshot.systems)
            by_name.update({s.name: s for produced, s in self._own_systems if produced > systems})
            self._systems = by_name
        self.loaded = (max(version, self.loaded[0]), max(systems, self.loaded[1]))
        self._own = [o for o in self._own if o[0] > self.loaded[0]]
        self._own_systems = [o for o in self._own_systems if o[0] > self.loaded[1]]

    def _apply(self, changes: Iterable[tuple[str, str | None]], version: int) -> None:
        for address, physical in changes:
            _change(self._entries, address, physical)
            self._own.append((version, address, physical))

    # -- systems ---------------------------------------------------------------------
    def put_system(self, name: str, host: str, port: int, protocol: str, *,
                   tls: str = "none", cafile: str | None = None, auth_user: str | None = None,
                   auth_file: str | None = None, rcpt: str = "") -> System:
        """Create or replace a system's delivery endpoint."""
        name = name.lower()
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise DirectoryError(f"system name {name!r} is not valid")
        if protocol not in PROTOCOLS:
            raise DirectoryError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not host or not (0 < port < 65536):
            raise DirectoryError(f"bad endpoint {host!r}:{port!r}")
        if tls not in TLS_MODES:
            raise DirectoryError(f"tls must be one of {TLS_MODES}, got {tls!r}")
        if cafile is not None and not cafile.startswith("/"):
            raise DirectoryError(f"cafile must be an absolute path, got {cafile!r}")
        if (auth_user is None) != (auth_file is None):
            raise DirectoryError("auth_user and auth_file go together")
        if auth_file is not None and not auth_file.startswith("/"):
            raise DirectoryError(f"auth_file must be an absolute path, got {auth_file!r}")
        if auth_user is not None and tls == "none":
            raise DirectoryError("SMTP AUTH needs tls starttls or implicit: fed never sends "
                                 "a password in cleartext")
        if rcpt:
            try:
                probe = format_address(rcpt, "a@b.example")
            except (KeyError, IndexError, ValueError):
                probe = ""
            if not is_valid(probe):
                raise DirectoryError(f"rcpt {rcpt!r} is not an address format ({{address}}, "
                                     "{local}, {domain})")
        with self.shared.write() as db:
            current = db.execute(select(t.systems).where(t.systems.c.name == name)).first()
            system = System(name, host, port, protocol,
                            0 if current is None else int(current.generation), tls, cafile,
                            auth_user, auth_file, rcpt)
            if current is None:
                db.execute(insert(t.systems).values(vars(system)))
            elif _system(current) != system:
                db.execute(update(t.systems).where(t.systems.c.name == name)
                           .values(host=host, port=port, protocol=protocol, tls=tls,
                                   cafile=cafile, auth_user=auth_user, auth_file=auth_file,
                                   rcpt=rcpt))
            if current is None or _system(current) != system:
                bump(db, "systems_version")
            version = counters(db)["systems_version"]
        self._systems[name] = system
        self._own_systems.append((version, system))
        return system

    def refresh_system(self, name: str) -> System | None:
        """Bump the system's generation (its tables changed): every node retires the
        connections it holds to it before their next transaction. None: not registered."""
        name = name.lower()
        with self.shared.write() as db:
            current = db.execute(select(t.systems).where(t.systems.c.name == name)).first()
            if current is None:
                return None
            system = replace(_system(current), generation=int(current.generation) + 1)
            db.execute(update(t.systems).where(t.systems.c.name == name)
                       .values(generation=system.generation))
            bump(db, "systems_version")
            version = counters(db)["systems_version"]
        self._systems[name] = system
        self._own_systems.append((version, system))
        return system

    def system(self, name: str) -> System | None:
        """The system called `name`, or None (from the copy)."""
        return self._systems.get(name.lower())

    def systems(self) -> list[System]:
        """Every registered system, by name."""
        with self.shared.read() as db:
            return [_system(r) for r in db.execute(select(t.systems).order_by(t.systems.c.name))]

    # -- entries ---------------------------------------------------------------------
    def lookup(self, address: str) -> str | None:
        """The physical address `address` routes to, or None (from the copy)."""
        return self._entries.get(address)

    def entries(self) -> dict[str, str]:
        """The whole directory, address -> physical."""
        with self.shared.read() as db:
            return _entries(db)

    def version(self) -> int:
        """Counter bumped by every directory change (the down-sync version)."""
        with self.shared.read() as db:
            return counters(db)["version"]

    def put(self, address: str, physical: str) -> bool:
        """Create or replace one entry; True if something changed."""
        with self.shared.write() as db:
            changed = _set(db, address, physical)
            version = counters(db)["version"]
        self._apply([(address, physical)], version)
        return changed

    def delete(self, address: str) -> bool:
        """Remove one entry; True if it existed."""
        with self.shared.write() as db:
            deleted = _delete(db, address)
            version = counters(db)["version"]
        self._apply([(address, None)], version)
        return deleted

    # -- flip (E9) -------------------------------------------------------------------
    def flip(self, addresses: list[str], source: str, target: str) -> FlipResult:
        """Move every address from `source` to `target` in one transaction, or none."""
        return self.flip_many([(addresses, source, target)])[0]

    def flip_many(self, flips: list[tuple[list[str], str, str]]) -> list[FlipResult]:
        """Several flips (addresses, source, target) in one transaction: all of them or none.

        Why: a wave cuts over many mailboxes under one hold; one transaction for all of them
        is one commit (and one refresh for the other nodes) instead of one per mailbox. The
        rules are those of a single flip, checked for every address before anything is
        written; an address named by two flips of the batch is refused (which one wins
        would be a guess)."""
        seen: dict[str, int] = {}
        for n, (addresses, _, _) in enumerate(flips):
            for address in addresses:
                if seen.setdefault(address, n) != n:
                    raise DirectoryError(f"{address} is in two flips of the batch "
                                         f"(number {seen[address] + 1} and {n + 1})")
        results = [FlipResult() for _ in flips]
        moved: list[tuple[str, str]] = []
        created: list[tuple[str, str]] = []
        with self.shared.write() as db:
            current = _physicals(db, list(seen))
            for (addresses, source, target), result in zip(flips, results, strict=True):
                for address in dict.fromkeys(addresses):
                    where = current.get(address)
                    if where == target:
                        result.already.append(address)
                    elif where == source:
                        moved.append((address, target))
                        result.flipped.append(address)
                    elif where is None:
                        created.append((address, target))
                        result.created.append(address)
                    else:
                        # Raising rolls the whole transaction back: nothing was flipped.
                        raise DirectoryConflict(
                            f"{address} routes to {where}, neither {source} nor {target}"
                        )
            if moved:
                db.execute(update(t.directory)
                           .where(t.directory.c.address == bindparam("key"))
                           .values(physical=bindparam("to")),
                           [{"key": a, "to": p} for a, p in moved])
            if created:
                db.execute(insert(t.directory),
                           [{"address": a, "physical": p} for a, p in created])
            if moved or created:
                bump(db, "version", len(moved) + len(created))  # one per change, as _set
            version = counters(db)["version"]
        self._apply([*moved, *created], version)
        return results

    # -- up-sync / down-sync / verify (E5-E8) ---------------------------------------
    def upsync(self, system: str, mailboxes: list[tuple[str, list[str]]]) -> UpsyncResult:
        """Store `system`'s latest address list and merge it into the directory."""
        result = UpsyncResult()
        with self.shared.write() as db:
            db.execute(delete(t.upsync).where(t.upsync.c.system == system))
            claims: dict[str, str] = {}  # address -> first physical of this system claiming it
            rows: dict[tuple[str, str], int] = {}
            for physical, addresses in mailboxes:
                for address in addresses:
                    rows.setdefault((physical, address), len(rows) + 1)
                    if address in claims and claims[address] != physical:
                        result.conflicts.append({
                            "address": address, "kept": claims[address], "rejected": physical,
                        })
                        continue
                    claims.setdefault(address, physical)
            if rows:
                db.execute(insert(t.upsync), [
                    {"system": system, "physical": p, "address": a, "position": n}
                    for (p, a), n in rows.items()
                ])
            now = time.time()
            if db.execute(update(t.upsync_state).where(t.upsync_state.c.system == system)
                          .values(at=now)).rowcount == 0:
                db.execute(insert(t.upsync_state).values(system=system, at=now))
            directory = _entries(db)
            for address, physical in claims.items():
                _merge_claim(db, system, address, physical, directory.get(address), result)
            # Addresses this system routed but no longer lists: its mailbox is gone.
            routed_here = {a for a, p in directory.items() if _system_of(p) == system}
            for address in sorted(routed_here - set(claims)):
                other = _other_claim(db, system, address)
                if other is None:
                    _delete(db, address)
                    result.removed.append(address)
                else:
                    _set(db, address, other)
                    result.updated[address] = other
            version = counters(db)["version"]
        changes: list[tuple[str, str | None]] = [*result.added.items(), *result.updated.items()]
        self._apply(changes + [(a, None) for a in result.removed], version)
        return result

    def downsync(self) -> tuple[int, dict[str, str]]:
        """(version, address book) every system should hold."""
        with self.shared.read() as db:
            return counters(db)["version"], _entries(db)

    def verify(self, system: str, physical: str, addresses: list[str]) -> str | None:
        """None if `system`'s latest up-sync lists `physical` with `addresses`, else why not."""
        with self.shared.read() as db:
            if upsync_missing(db, system, [], physical) is None:
                return f"no up-sync received from system {system}"
            listed = upsync_listed(db, system, physical)
        if not listed:
            return f"the latest up-sync of {system} does not list {physical}"
        missing = [a for a in addresses if a not in listed]
        if missing:
            return f"the latest up-sync of {system} lists {physical} without: {', '.join(missing)}"
        return None

    def upsync_systems(self) -> dict[str, float]:
        """System name -> time of its latest up-sync."""
        with self.shared.read() as db:
            rows = db.execute(select(t.upsync_state).order_by(t.upsync_state.c.system))
            return {str(r.system): float(r.at) for r in rows}


def upsync_missing(db: Connection, system: str, addresses: list[str],
                   physical: str | None = None) -> list[str] | None:
    """Which `addresses` the latest up-sync of `system` does not list (for `physical`, if
    given); None if that system never up-synced. The E8 check."""
    if db.scalar(select(t.upsync_state.c.at).where(t.upsync_state.c.system == system)) is None:
        return None
    listed = upsync_listed(db, system, physical)
    return [a for a in addresses if a not in listed]


def upsync_listed(db: Connection, system: str, physical: str | None = None) -> set[str]:
    """The addresses the latest up-sync of `system` lists (for `physical`, if given)."""
    query = select(t.upsync.c.address).where(t.upsync.c.system == system)
    if physical is not None:
        query = query.where(t.upsync.c.physical == physical)
    return {str(a) for a in db.scalars(query)}


def read_snapshot(shared: SharedDB, have_directory: tuple[int, int], have_holds: int
                  ) -> Snapshot:
    """Read the counters and whatever moved since the given versions (call in a thread).

    The counters come from one statement, so if the holds counter shows a release, the
    directory counter shows every flip committed before it; the data read next is at least
    that new.
    """
    with shared.read() as db:
        now = counters(db)
        snap = Snapshot(now)
        if now["version"] != have_directory[0]:
            snap.entries = _entries(db)
        if now["systems_version"] != have_directory[1]:
            snap.systems = {str(r.name): _system(r) for r in db.execute(select(t.systems))}
        if now["holds_version"] != have_holds:
            snap.holds = [(str(r.address), str(r.origin), float(r.since))
                          for r in db.execute(select(t.holds))]
    return snap


def _merge_claim(db: Connection, system: str, address: str, physical: str,
                 current: str | None, result: UpsyncResult) -> None:
    """Apply one (address, physical) claim of `system` to the directory."""
    if current == physical:
        return
    if current is None:
        other = _other_claim(db, system, address)
        if other is not None:
            # Another system listed it first: keep the first claim, report ours.
            _set(db, address, other)
            result.added[address] = other
            result.conflicts.append({"address": address, "kept": other, "rejected": physical})
            return
        _set(db, address, physical)
        result.added[address] = physical
    elif _system_of(current) == system:
        # The system moved the address between its own mailboxes: it is authoritative.
        _set(db, address, physical)
        result.updated[address] = physical
    # else: routed to another system's mailbox; only a flip may move it.


def _system(r: Row[Any]) -> System:
    return System(str(r.name), str(r.host), int(r.port), str(r.protocol),
                  int(r.generation or 0), str(r.tls or "none"),
                  None if r.cafile is None else str(r.cafile),
                  None if r.auth_user is None else str(r.auth_user),
                  None if r.auth_file is None else str(r.auth_file), str(r.rcpt or ""))


def _change(entries: dict[str, str], address: str, physical: str | None) -> None:
    if physical is None:
        entries.pop(address, None)
    else:
        entries[address] = physical


def _system_of(physical: str) -> str | None:
    split = split_physical(physical)
    return split[0] if split else None


def _entries(db: Connection) -> dict[str, str]:
    rows = db.execute(select(t.directory.c.address, t.directory.c.physical)
                      .order_by(t.directory.c.address))
    return {str(a): str(p) for a, p in rows}


def _physicals(db: Connection, addresses: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for start in range(0, len(addresses), _IN_CHUNK):
        rows = db.execute(select(t.directory.c.address, t.directory.c.physical)
                          .where(t.directory.c.address.in_(addresses[start:start + _IN_CHUNK])))
        found.update((str(a), str(p)) for a, p in rows)
    return found


_IN_CHUNK = 900  # addresses per IN (...): below SQLite's oldest limit of 999 parameters


def _other_claim(db: Connection, system: str, address: str) -> str | None:
    """The physical another system's latest up-sync gives `address` (earliest first)."""
    u, s = t.upsync, t.upsync_state
    return db.scalar(
        select(u.c.physical).join(s, s.c.system == u.c.system)
        .where(u.c.address == address, u.c.system != system)
        .order_by(s.c.at, u.c.position).limit(1)
    )


def _set(db: Connection, address: str, physical: str) -> bool:
    current = db.scalar(select(t.directory.c.physical).where(t.directory.c.address == address))
    if current == physical:
        return False
    if current is None:
        db.execute(insert(t.directory).values(address=address, physical=physical))
    else:
        db.execute(update(t.directory).where(t.directory.c.address == address)
                   .values(physical=physical))
    bump(db, "version")
    return True


def _delete(db: Connection, address: str) -> bool:
    if db.execute(delete(t.directory).where(t.directory.c.address == address)).rowcount:
        bump(db, "version")
        return True
    return False
