"""The overlay tables mailferry keeps on an adopted Postfix + Dovecot system.

On a system the admin built (`pfdovecot_adopt`), the admin's tables stay theirs, byte for
byte. What mailferry must add lives in its state folder, in tables that main.cf lists
*first* (``virtual_alias_maps = hash:<stateDir>/virtual_alias, <admin's>``, the same for
``virtual_mailbox_maps`` and ``transport_maps``; ``<system>.invalid`` appended to
``virtual_mailbox_domains``), so that Postfix consults them before the admin's and removing
them restores the system:

- ``virtual_alias``: each adopted mailbox's physical address -> its access address (fed
  delivers ``<mailbox id>@<system>.invalid``, Dovecot knows the access address), or -> the
  redirect target once redirected; for the mailboxes mailferry created here, what the owned
  layout writes (`pfdovecot_tables`); and ``address address`` for each address that lives on
  another system (fed's address book, down-sync), which makes it a valid recipient even in a
  ``virtual_mailbox_domains`` domain, so that colleagues who moved are accepted, not refused
  with 550, and ...
- ``transport``: ... sent to fed (``smtp:[fed]:port``), with every address of a mailbox in
  its cutover (``via_fed``) or redirected, and the domains of redirect targets (a change is
  followed by ``postfix reload``: trivial-rewrite does not notice it by itself);
- ``virtual_mailbox`` and ``passwd``: the mailboxes mailferry creates here, exactly as the
  owned layout (Dovecot reads ``passwd`` through the passdb/userdb the admin added for it).

The crash-safety order is `Tables`': one transaction, files replaced before the commit. The
transport table is replaced first: an address gets its route to fed before its alias line
makes it valid.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler.drivers.hosts import Host, HostError
from reconciler.drivers.pfdovecot_tables import TableError, Tables

ADOPTED_SCHEMA = """
CREATE TABLE IF NOT EXISTS adopted (
    mailbox_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    address TEXT NOT NULL,
    admin_aliases TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]',
    home TEXT NOT NULL DEFAULT '',
    redirect_to TEXT,
    syncfed INTEGER NOT NULL DEFAULT 0,
    via_fed INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class AdoptedRow:
    """One of the admin's mailboxes as mailferry tracks it."""

    mailbox_id: str
    user: str  # Dovecot user name
    address: str  # access address (Postfix delivers it to Dovecot by the admin's maps)
    admin_aliases: tuple[str, ...]  # the admin's single-target aliases (their maps)
    aliases: tuple[str, ...]  # the aliases mailferry reports (admin's + any it added)
    home: str
    redirect_to: str | None
    syncfed: bool
    via_fed: bool


def adopted_of(r: sqlite3.Row) -> AdoptedRow:
    return AdoptedRow(r["mailbox_id"], r["user"], r["address"],
                      tuple(json.loads(r["admin_aliases"])), tuple(json.loads(r["aliases"])),
                      r["home"], r["redirect_to"], bool(r["syncfed"]), bool(r["via_fed"]))


class OverlayTables(Tables):
    """`Tables` for an adopted system: the created mailboxes plus the overlay lines."""

    header = "# mailferry's overlay (reconcile release removes it): edits are overwritten\n"

    def __init__(self, state_dir: Path, system: str, postfix_dir: str, mail_root: str,
                 uid: int, gid: int, *, fed: str, dovecot_config: str | None = None,
                 host: Host | None = None, tables_dir: str | None = None) -> None:
        super().__init__(state_dir, system, postfix_dir, mail_root, uid, gid,
                         dovecot_config=dovecot_config, host=host, tables_dir=tables_dir)
        self.fed = fed  # the transport to fed: smtp:[host]:port

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """`Tables.read` with the adopted table (made outside any transaction: executescript
        commits)."""
        with super().read() as conn:
            conn.executescript(ADOPTED_SCHEMA)
            yield conn

    def adopted(self, conn: sqlite3.Connection) -> list[AdoptedRow]:
        return [adopted_of(r) for r in conn.execute("SELECT * FROM adopted ORDER BY mailbox_id")]

    def render(self, conn: sqlite3.Connection) -> dict[str, str]:
        files = super().render(conn)
        alias: list[str] = []
        transport: dict[str, str] = {}
        local: set[str] = set()
        for row in self.rows(conn):  # mailboxes mailferry created here
            if row.via_fed:  # valid recipient, routed through fed (hold and directory decide)
                for address in (*row.access_addresses, *row.aliases):
                    alias.append(f"{address}\t{address}")
                    transport[address] = self.fed
            else:
                local.update(row.access_addresses + row.aliases)
            if row.redirect_to:
                transport.setdefault(_domain(row.redirect_to), self.fed)
        for a in self.adopted(conn):
            adp = self.physical(a.mailbox_id)
            extra = [x for x in a.aliases if x not in a.admin_aliases and x != a.address]
            if a.redirect_to:
                alias.append(f"{adp}\t{a.redirect_to}")
                transport.setdefault(_domain(a.redirect_to), self.fed)
            else:
                alias.append(f"{adp}\t{a.address}")
            alias.extend(f"{x}\t{a.address}" for x in extra)
            if a.via_fed or a.redirect_to:
                transport[a.address] = self.fed
            else:
                local.add(a.address)
                local.update(a.aliases)
        here = f"@{self.system}.invalid"
        for address, physical in sorted(_address_book(conn).items()):
            if physical.endswith(here) or address in local or address in transport:
                continue
            alias.append(f"{address}\t{address}")
            transport[address] = self.fed
        files["virtual_alias"] += "".join(f"{line}\n" for line in alias)
        files["transport"] = self.header + "".join(
            f"{k}\t{v}\n" for k, v in sorted(transport.items()))
        return files

    def install(self, conn: sqlite3.Connection) -> None:
        """The transport table first, then `Tables.install` (passwd, mailbox, alias)."""
        if not self.files:
            return
        text = self.render(conn)["transport"]
        changed = self._read_table("transport") != text
        self._replace("transport", text, postmap=True)
        super().install(conn)
        if changed:
            self._reload()

    def _reload(self) -> None:
        """`postfix reload` after a transport change. Unlike the alias maps (cleanup and
        smtpd restart when theirs changes), trivial-rewrite only notices a changed table on a
        new connection, and qmgr keeps its connection open: without the reload a moved
        address would still be delivered to BOX1 by the old route."""
        try:
            self.host.run(["postfix", "-c", self.postfix_dir, "reload"], timeout=60)
        except HostError as exc:
            if "not running" not in str(exc):  # nothing to reload: the next start reads it
                raise TableError(f"postfix reload: {exc}") from exc

    def overlay_files(self) -> list[str]:
        """Every file of the overlay on the mail host (the maps and their .db)."""
        return [self.table_path(f"{name}{ext}") for name in ("virtual_alias", "virtual_mailbox",
                                                              "transport") for ext in ("", ".db")]


def _domain(address: str) -> str:
    return address.rsplit("@", 1)[-1]


def _address_book(conn: sqlite3.Connection) -> dict[str, str]:
    return {str(r["address"]): str(r["physical"])
            for r in conn.execute("SELECT address, physical FROM address_book")}
