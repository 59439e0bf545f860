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

Every method runs on the event loop thread (see ``store.py``) and validates its input,
raising ``DirectoryError`` with a message meant for the API caller.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from .addresses import is_valid, normalize, split_physical
from .store import Store

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
    """Normalise and validate an address coming from outside."""
    if not isinstance(raw, str):
        raise DirectoryError(f"{what} must be a string, got {raw!r}")
    address = normalize(raw)
    if not is_valid(address):
        raise DirectoryError(f"{what} {raw!r} is not a valid address")
    return address


def check_physical(raw: object, what: str = "physical") -> str:
    """Normalise and validate a physical address (``<id>@<system>.invalid``)."""
    address = check_address(raw, what)
    if split_physical(address) is None:
        raise DirectoryError(f"{what} {raw!r} is not a physical address (<id>@<system>.invalid)")
    return address


class Directory:
    """Directory entries, systems registry, up-sync state, all in the fed store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- systems ---------------------------------------------------------------------
    def put_system(self, name: str, host: str, port: int, protocol: str) -> System:
        """Create or replace a system's delivery endpoint."""
        name = name.lower()
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise DirectoryError(f"system name {name!r} is not valid")
        if protocol not in PROTOCOLS:
            raise DirectoryError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not host or not (0 < port < 65536):
            raise DirectoryError(f"bad endpoint {host!r}:{port!r}")
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO systems (name, host, port, protocol) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET host=excluded.host, port=excluded.port, "
                "protocol=excluded.protocol",
                (name, host, port, protocol),
            )
        return System(name, host, port, protocol)

    def system(self, name: str) -> System | None:
        """The system called `name`, or None."""
        rows = self.store.query("SELECT * FROM systems WHERE name = ?", (name.lower(),))
        return _system(rows[0]) if rows else None

    def systems(self) -> list[System]:
        """Every registered system, by name."""
        return [_system(r) for r in self.store.query("SELECT * FROM systems ORDER BY name")]

    # -- entries ---------------------------------------------------------------------
    def lookup(self, address: str) -> str | None:
        """The physical address `address` routes to, or None."""
        rows = self.store.query("SELECT physical FROM directory WHERE address = ?", (address,))
        return str(rows[0]["physical"]) if rows else None

    def entries(self) -> dict[str, str]:
        """The whole directory, address -> physical."""
        rows = self.store.query("SELECT address, physical FROM directory ORDER BY address")
        return {str(r["address"]): str(r["physical"]) for r in rows}

    def version(self) -> int:
        """Counter bumped by every directory change (the down-sync version)."""
        rows = self.store.query("SELECT value FROM meta WHERE key = 'version'")
        return int(rows[0]["value"]) if rows else 0

    def put(self, address: str, physical: str) -> bool:
        """Create or replace one entry; True if something changed."""
        with self.store.transaction() as db:
            return _set(db, address, physical)

    def delete(self, address: str) -> bool:
        """Remove one entry; True if it existed."""
        with self.store.transaction() as db:
            return _delete(db, address)

    # -- flip (E9) -------------------------------------------------------------------
    def flip(self, addresses: list[str], source: str, target: str) -> FlipResult:
        """Move every address from `source` to `target` in one transaction, or none."""
        result = FlipResult()
        with self.store.transaction() as db:
            for address in addresses:
                row = db.execute(
                    "SELECT physical FROM directory WHERE address = ?", (address,)
                ).fetchone()
                current = None if row is None else str(row["physical"])
                if current == target:
                    result.already.append(address)
                elif current == source:
                    _set(db, address, target)
                    result.flipped.append(address)
                elif current is None:
                    _set(db, address, target)
                    result.created.append(address)
                else:
                    # Raising rolls the whole transaction back: nothing was flipped.
                    raise DirectoryConflict(
                        f"{address} routes to {current}, neither {source} nor {target}"
                    )
        return result

    # -- up-sync / down-sync / verify (E5-E8) ---------------------------------------
    def upsync(self, system: str, mailboxes: list[tuple[str, list[str]]]) -> UpsyncResult:
        """Store `system`'s latest address list and merge it into the directory."""
        result = UpsyncResult()
        with self.store.transaction() as db:
            db.execute("DELETE FROM upsync WHERE system = ?", (system,))
            claims: dict[str, str] = {}  # address -> first physical of this system claiming it
            position = 0
            for physical, addresses in mailboxes:
                for address in addresses:
                    position += 1
                    db.execute(
                        "INSERT OR IGNORE INTO upsync (system, physical, address, position) "
                        "VALUES (?, ?, ?, ?)",
                        (system, physical, address, position),
                    )
                    if address in claims and claims[address] != physical:
                        result.conflicts.append({
                            "address": address, "kept": claims[address], "rejected": physical,
                        })
                        continue
                    claims.setdefault(address, physical)
            db.execute(
                "INSERT INTO upsync_state (system, at) VALUES (?, ?) "
                "ON CONFLICT (system) DO UPDATE SET at = excluded.at",
                (system, time.time()),
            )
            for address, physical in claims.items():
                self._merge_claim(db, system, address, physical, result)
            # Addresses this system routed but no longer lists: its mailbox is gone.
            routed_here = {
                str(r["address"]): str(r["physical"])
                for r in db.execute("SELECT address, physical FROM directory")
                if _system_of(str(r["physical"])) == system
            }
            for address in sorted(set(routed_here) - set(claims)):
                other = _other_claim(db, system, address)
                if other is None:
                    _delete(db, address)
                    result.removed.append(address)
                else:
                    _set(db, address, other)
                    result.updated[address] = other
        return result

    def _merge_claim(
        self, db: sqlite3.Connection, system: str, address: str, physical: str,
        result: UpsyncResult,
    ) -> None:
        """Apply one (address, physical) claim of `system` to the directory."""
        row = db.execute("SELECT physical FROM directory WHERE address = ?", (address,)).fetchone()
        current = None if row is None else str(row["physical"])
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

    def downsync(self) -> tuple[int, dict[str, str]]:
        """(version, address book) every system should hold."""
        with self.store.transaction():
            return self.version(), self.entries()

    def verify(self, system: str, physical: str, addresses: list[str]) -> str | None:
        """None if `system`'s latest up-sync lists `physical` with `addresses`, else why not."""
        if not self.store.query("SELECT 1 FROM upsync_state WHERE system = ?", (system,)):
            return f"no up-sync received from system {system}"
        listed = {
            str(r["address"])
            for r in self.store.query(
                "SELECT address FROM upsync WHERE system = ? AND physical = ?", (system, physical)
            )
        }
        if not listed:
            return f"the latest up-sync of {system} does not list {physical}"
        missing = [a for a in addresses if a not in listed]
        if missing:
            return f"the latest up-sync of {system} lists {physical} without: {', '.join(missing)}"
        return None

    def upsync_systems(self) -> dict[str, float]:
        """System name -> time of its latest up-sync."""
        rows = self.store.query("SELECT system, at FROM upsync_state ORDER BY system")
        return {str(r["system"]): float(r["at"]) for r in rows}


def _system(row: sqlite3.Row) -> System:
    return System(str(row["name"]), str(row["host"]), int(row["port"]), str(row["protocol"]))


def _system_of(physical: str) -> str | None:
    split = split_physical(physical)
    return split[0] if split else None


def _other_claim(db: sqlite3.Connection, system: str, address: str) -> str | None:
    """The physical another system's latest up-sync gives `address` (earliest first)."""
    row = db.execute(
        "SELECT u.physical FROM upsync u JOIN upsync_state s ON s.system = u.system "
        "WHERE u.address = ? AND u.system != ? ORDER BY s.at, u.position LIMIT 1",
        (address, system),
    ).fetchone()
    return None if row is None else str(row["physical"])


def _bump(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('version', '1') "
        "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
    )


def _set(db: sqlite3.Connection, address: str, physical: str) -> bool:
    row = db.execute("SELECT physical FROM directory WHERE address = ?", (address,)).fetchone()
    if row is not None and str(row["physical"]) == physical:
        return False
    db.execute(
        "INSERT INTO directory (address, physical) VALUES (?, ?) "
        "ON CONFLICT (address) DO UPDATE SET physical = excluded.physical",
        (address, physical),
    )
    _bump(db)
    return True


def _delete(db: sqlite3.Connection, address: str) -> bool:
    if db.execute("DELETE FROM directory WHERE address = ?", (address,)).rowcount:
        _bump(db)
        return True
    return False
