"""An adopted Postfix + Dovecot system: the admin's own, with mailferry's overlay on top.

``driver: postfix-dovecot`` with ``postfixDovecot.adopt: true``. The system stays as the admin
built it (any Dovecot userdb, any Postfix maps): mailferry learns its mailboxes from the
servers (`pfdovecot_learn`), never rewrites the admin's tables, and keeps what it adds in
overlay tables it owns (`pfdovecot_overlay`), listed first in main.cf. Its lifecycle:

- ``reconcile adopt --check SYSTEM`` (`check`): every check, read-only, and the list of what
  adoption would add; each blocker comes with its fix.
- ``reconcile adopt SYSTEM`` (`adopt`, also run on the driver's first use): the checks again,
  then the *adoption record* (``<stateDir>/adoption.json``: ``postconf -n``, main.cf's bytes,
  the values of the four parameters mailferry changes, SHA-256 of every admin file mailferry
  reads), the (empty) overlay tables, then the four parameters (``postconf -e``, journalled,
  ``postfix reload``).
- ``reconcile release SYSTEM`` (`release`): the parameters get the admin's values back
  (main.cf its bytes of adoption day when ``postconf -n`` says nothing else changed), the
  overlay files go, and the ``postconf -n`` and map diff against the record is printed.

Mailbox ids are mailferry's (``local=domain`` of the access address, so physical addresses
look as everywhere); the Dovecot user name behind each is kept in the ``adopted`` table and
is what the master user logs in as. Mailboxes mailferry creates here (a migration's target)
are rows of the owned layout's account table, in the overlay passwd-file the admin's Dovecot
reads through the passdb/userdb `check` asks for. The admin's mailboxes are never deleted:
E41 on one is refused with what to do.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.drivers.base import Account
from reconciler.drivers.imapstore import ImapLogin, imap_session
from reconciler.drivers.pfdovecot_keys import AliasKeys, find_alias_keys, read_candidates
from reconciler.drivers.pfdovecot_learn import (
    LISTABLE,
    Learned,
    learn,
    map_type,
    split_list,
)
from reconciler.drivers.pfdovecot_overlay import (
    AdoptedRow,
    OverlayTables,
    adopted_of,
)
from reconciler.drivers.pfdovecot_tables import TableError
from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver
from reconciler.errors import MailferryError, PermanentError, TemporaryError
from reconciler.secrets import resolve

# The parameters adoption changes (each keeps the admin's value after mailferry's).
OVERLAID = ("virtual_alias_maps", "virtual_mailbox_maps", "transport_maps",
            "virtual_mailbox_domains")
RECORD = "adoption.json"


@dataclass
class AdoptionCheck:
    """What `reconcile adopt --check` prints: what adoption adds, what blocks it."""

    system: str
    adds: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # "what: why. fix: how"
    warnings: list[str] = field(default_factory=list)  # does not block; "... fix: how"
    notes: list[str] = field(default_factory=list)
    mailboxes: int = 0

    @property
    def ok(self) -> bool:
        return not self.blockers

    def lines(self) -> list[str]:
        out = [f"{self.system}: {self.mailboxes} mailboxes found on the system"]
        out += [f"  + would {a}" for a in self.adds]
        out += [f"  ! blocks: {b}" for b in self.blockers]
        out += [f"  ~ warns: {w}" for w in self.warnings]
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"{self.system}: " + ("ready to adopt (reconcile adopt "
                                          f"{self.system})" if self.ok else
                                          f"{len(self.blockers)} blocker(s); nothing changed"))
        return out


class AdoptedPostfixDovecotDriver(PostfixDovecotDriver):
    """The admin's Postfix + Dovecot system with mailferry's overlay (module docstring)."""

    _checked = False  # `check` passed just now: `configure` need not run it again

    # -- plumbing -------------------------------------------------------------------------
    @property
    def tables(self) -> OverlayTables:
        if self._tables is None:
            fed = f"smtp:[{self.fed_smtp.host}]:{self.fed_smtp.port}"
            self._tables = OverlayTables(Path(self.options.state_dir), self.name,
                                         self.options.postfix_config_dir,
                                         self.options.mail_root, *self._mail_user_ids(),
                                         fed=fed,
                                         dovecot_config=self.options.dovecot_config,
                                         host=self.host,
                                         tables_dir=self.options.tables_folder)
        assert isinstance(self._tables, OverlayTables)
        return self._tables

    @property
    def record_path(self) -> Path:
        return Path(self.options.state_dir) / RECORD

    def record(self) -> dict[str, object] | None:
        """The adoption record, or None before adoption."""
        try:
            data: dict[str, object] = json.loads(self.record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return data

    def _admin_values(self) -> dict[str, str]:
        """The admin's values of the overlaid parameters: recorded, or as main.cf has them."""
        rec = self.record()
        if rec is not None:
            values = rec["values"]
            assert isinstance(values, dict)
            return {str(k): str(v) for k, v in values.items()}
        return dict(zip(OVERLAID, (v.strip() for v in self._postconf(list(OVERLAID))),
                        strict=True))

    def _ours(self) -> dict[str, str]:
        table = self.tables.table_path  # on the mail host
        return {"virtual_alias_maps": f"hash:{table('virtual_alias')}",
                "virtual_mailbox_maps": f"hash:{table('virtual_mailbox')}",
                "transport_maps": f"hash:{table('transport')}",
                "virtual_mailbox_domains": f"{self.name}.invalid"}

    def wanted_postfix(self) -> dict[str, str]:
        """mailferry's table first, then the admin's (its domain last)."""
        admin, ours = self._admin_values(), self._ours()
        wanted = {}
        for name in OVERLAID:
            parts = [ours[name], admin[name]]
            if name == "virtual_mailbox_domains":
                parts.reverse()
            wanted[name] = ", ".join(p for p in parts if p)
        return wanted

    def _admin_tables(self, values: dict[str, str]) -> dict[str, list[str]]:
        ours = set(self._ours().values())
        return {name: [t for t in split_list(values[name]) if t not in ours and ":" in t]
                for name in OVERLAID}

    def alias_keys(self) -> AliasKeys:
        """Candidate keys of the admin's alias maps that cannot be listed (`pfdovecot_keys`):
        from their backing store, and the file aliasCandidates names."""
        tables = self._admin_tables(self._admin_values())["virtual_alias_maps"]
        asked = [(t, map_type(t)) for t in tables if map_type(t) not in LISTABLE]
        given: list[str] = []
        unread: list[str] = []
        path = self.options.alias_candidates
        if asked and path is not None:
            try:
                given = read_candidates(path)
            except (OSError, UnicodeDecodeError) as exc:
                unread.append(f"aliasCandidates {path}: {getattr(exc, 'strerror', None) or exc}"
                              ". fix: give a readable UTF-8 file, one address a line")
        found = find_alias_keys(self.host, asked, self.domains, given)
        found.warnings[:0] = unread
        return found

    def learn(self) -> Learned:
        """The admin's mailboxes as the servers know them now."""
        tables = self._admin_tables(self._admin_values())
        keys = self.alias_keys()
        learned = learn(self._run, postfix_dir=self.options.postfix_config_dir,
                        dovecot_config=self.options.dovecot_config, domains=self.domains,
                        mailbox_maps=tables["virtual_mailbox_maps"],
                        alias_maps=tables["virtual_alias_maps"], alias_keys=keys.keys)
        learned.warnings += keys.warnings
        learned.notes += keys.notes
        return learned

    # -- checks ---------------------------------------------------------------------------
    def check(self) -> AdoptionCheck:
        """Every check adoption needs, reading only; what it would add."""
        result = AdoptionCheck(self.name)
        try:
            self._check_into(result)
        except MailferryError as exc:
            fix = ("correct what Postfix names (postconf must run without a fatal error)"
                   if "fatal:" in str(exc) else "make the servers answer")
            result.blockers.append(f"{exc}. fix: {fix}, then check again")
        return result

    def _check_into(self, result: AdoptionCheck) -> None:
        config, dovecot = self.options.postfix_config_dir, self.options.dovecot_config
        state = Path(self.options.state_dir)
        passwd = self.tables.table_path("passwd")
        admin = self._admin_values()
        transport = self._postconf(["virtual_transport"])[0].strip()
        if not transport.startswith("lmtp:"):
            result.blockers.append(
                f"virtual_transport is {transport!r}: mailferry delivers the mailboxes it "
                "creates here through it. fix: deliver to Dovecot over LMTP "
                "(virtual_transport = lmtp:inet:HOST:PORT or lmtp:unix:PATH)")
        known = set(self._run(["postconf", "-c", config, "-m"], "postconf -m").split())
        for name, tables in self._admin_tables(admin).items():
            for table in tables:
                kind = map_type(table)
                if kind not in known:
                    result.blockers.append(
                        f"{name} uses {table}: Postfix here cannot read {kind}: maps "
                        f"(postconf -m). fix: install the map type (Debian: postfix-{kind})")
        doveconf = self._run(["doveconf", "-c", dovecot, "-n"], "doveconf -n")
        if "master = yes" not in doveconf:
            result.blockers.append(
                "Dovecot has no master passdb: mailferry copies mail over IMAP as a master "
                f"user ({self.options.master.user}). fix: add to {dovecot}: passdb {{ driver "
                "= passwd-file  master = yes  pass = yes  args = scheme=CRYPT "
                "username_format=%u /etc/dovecot/master-users }} with that user's password")
        if passwd not in doveconf:
            result.blockers.append(
                f"Dovecot reads no passdb/userdb from {passwd}: the mailboxes mailferry "
                f"creates here live there. fix: add to {dovecot}: passdb {{ driver = "
                f"passwd-file  args = scheme=CRYPT username_format=%n {passwd} }} userdb {{ "
                f"driver = passwd-file  args = username_format=%n {passwd} }}")
        chars = self._run(["doveconf", "-c", dovecot, "-h", "auth_username_chars"],
                          "doveconf").strip()
        if chars and "=" not in chars:
            result.blockers.append(
                "Dovecot's auth_username_chars lacks '=': the mailboxes mailferry creates are "
                "named local=domain. fix: append = to auth_username_chars")
        if result.blockers:  # the rest needs a Dovecot that can list its users with the overlay
            result.warnings += self.alias_keys().warnings  # still worth saying (reads only)
            return
        if not self.host.exists(passwd):  # mailferry's own file: Dovecot's iteration needs it
            self.host.replace_file(passwd, b"")
        try:
            learned = self.learn()
        except TemporaryError as exc:
            result.blockers.append(f"{exc}. fix: make Dovecot's userdb iterable (an "
                                   "iterate_query for sql, a passwd-file) and Postfix's maps "
                                   "readable by postmap")
            return
        result.mailboxes = len(learned.mailboxes)
        result.notes += learned.notes
        result.warnings += learned.warnings
        if learned.mailboxes:
            self._check_master_login(learned.mailboxes[0].user, result)
        wanted = self.wanted_postfix()
        for name in OVERLAID:
            if admin[name] != wanted[name]:
                result.adds.append(f"set {name} = {wanted[name]}")
        result.adds.append(f"keep its overlay tables in {self.tables.tables_dir} ("
                           f"{self.host.label}: virtual_alias, "
                           "virtual_mailbox, transport, passwd): reconcile release removes them")
        result.adds.append(f"record the system as adopted in {state / RECORD}")

    def _check_master_login(self, user: str, result: AdoptionCheck) -> None:
        imap = self.options.imap
        master = self.options.master
        login = ImapLogin(user, lambda: resolve(
            master.password, what=f"{self.name} IMAP master user {master.user}"), master.user)
        try:
            with imap_session(imap.host, imap.port, self.options.imap_tls, login,
                              system=self.name, cafile=self.options.imap_cafile):
                pass
        except MailferryError as exc:
            result.blockers.append(
                f"the master user {master.user} cannot open {user}'s mailbox over IMAP "
                f"({exc}). fix: give the master passdb this user with the password of "
                "masterUser.password")

    def check_config(self) -> list[str]:
        """`configure` (the owned driver's) calls this before any change (not twice when
        `adopt` has just checked)."""
        if self._checked:
            return []
        return self.check().blockers

    # -- adoption and release --------------------------------------------------------------
    def adopt(self) -> AdoptionCheck:
        """Check everything, record the admin's state, install the overlay (idempotent)."""
        found = self.check()
        if not found.ok:
            raise TemporaryError(f"{self.name}: adoption refused: " + "; ".join(found.blockers))
        if self.record() is None:
            self._write_record()
        self._configured = False
        self._checked = True
        try:
            self.configure()
        finally:
            self._checked = False
        return found

    def configure(self) -> None:
        if self._configured:
            return
        if self.record() is None:  # first use with adopt: true: adopt first
            found = self.check()
            if not found.ok:
                raise TemporaryError(f"{self.name}: adoption refused: "
                                     + "; ".join(found.blockers))
            self._write_record()
            self._checked = True
        try:
            super().configure()
        finally:
            self._checked = False

    def _write_record(self) -> None:
        config = self.options.postfix_config_dir
        values = dict(zip(OVERLAID, (v.strip() for v in self._postconf(list(OVERLAID))),
                          strict=True))
        main_cf = self.host.read_file(f"{config.rstrip('/')}/main.cf")
        if main_cf is None:
            raise TemporaryError(f"{self.name}: no main.cf in {config} ({self.host.label})")
        record = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "values": values,
            "explicit": sorted(line.split("=", 1)[0].strip() for line in self._run(
                ["postconf", "-c", config, "-n"], "postconf -n").splitlines()
                if line.split("=", 1)[0].strip() in OVERLAID),
            "postconf_n": self._run(["postconf", "-c", config, "-n"], "postconf -n"),
            "main_cf": main_cf.decode("utf-8"),
            "files": self.admin_file_hashes(values),
        }
        state = Path(self.options.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        tmp = state / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, self.record_path)

    def admin_file_hashes(self, values: dict[str, str] | None = None) -> dict[str, str]:
        """SHA-256 of the admin's files mailferry reads: main.cf, master.cf, dovecot.conf and
        every file-based map of the overlaid parameters (source and .db)."""
        config = self.options.postfix_config_dir.rstrip("/")
        paths = [f"{config}/main.cf", f"{config}/master.cf", self.options.dovecot_config]
        for tables in self._admin_tables(values or self._admin_values()).values():
            for table in tables:
                path = table.split(":")[-1]
                if path.startswith("/"):
                    paths += [path, f"{path}.db"]
        found: dict[str, str] = {}
        for path in paths:
            data = self.host.read_file(path)
            if data is not None:
                found[path] = hashlib.sha256(data).hexdigest()
        return found

    def release(self, *, force: bool = False) -> list[str]:
        """Remove everything mailferry added; the diff against the adoption record.

        Refused (nothing changed) while mailboxes mailferry created here exist, unless
        `force`: without the overlay their mail would bounce."""
        rec = self.record()
        if rec is None:
            raise PermanentError(f"{self.name}: not adopted (no {self.record_path})")
        created = [r.mailbox_id for r in self._read("list accounts", self.tables.rows)]
        if created and not force:
            raise PermanentError(
                f"{self.name}: {len(created)} mailbox(es) mailferry created here would lose "
                f"their routes and their Dovecot account ({', '.join(created[:5])}"
                f"{' ...' if len(created) > 5 else ''}): move them to the admin's tables "
                "first, or release --force")
        config = self.options.postfix_config_dir
        values = rec["values"]
        explicit = set(rec["explicit"])  # type: ignore[call-overload]
        assert isinstance(values, dict)
        lines_before, routine = self._in_flight()
        if created:  # forced: their rows go (the overlay passwd-file is rendered empty)
            try:
                with self.tables.write() as conn:
                    conn.execute("DELETE FROM accounts")
            except (TableError, OSError, sqlite3.Error) as exc:
                raise TemporaryError(f"{self.name}: release: {exc}") from exc
        restore = [f"{k}={values[k]}" for k in OVERLAID if k in explicit]
        drop = [k for k in OVERLAID if k not in explicit]
        if restore:
            self._run(["postconf", "-c", config, "-e", *restore], "postconf -e")
        if drop:
            self._run(["postconf", "-c", config, "-X", *drop], "postconf -X")
        after = self._run(["postconf", "-c", config, "-n"], "postconf -n")
        if after == rec["postconf_n"]:  # nothing else changed: the admin's very bytes
            self.host.replace_file(f"{config.rstrip('/')}/main.cf",
                                   str(rec["main_cf"]).encode("utf-8"))
        self._run(["postfix", "-c", config, "reload"], "postfix reload")
        report = ["".join(difflib.unified_diff(
            str(rec["postconf_n"]).splitlines(keepends=True), after.splitlines(keepends=True),
            "postconf -n (at adoption)", "postconf -n (now)"))]
        for name, lines in lines_before.items():
            if lines:
                report.append("".join(difflib.unified_diff(
                    lines, [], f"{name} (mailferry's overlay, in flight)", f"{name} (released)")))
        report.append(routine)
        for path in self.tables.overlay_files():
            self.host.remove_file(path)
        changed = [p for p, h in self.admin_file_hashes(
            {str(k): str(v) for k, v in values.items()}).items()
            if rec["files"].get(p) != h]  # type: ignore[attr-defined]
        report.append("admin's files: " + (f"changed since adoption: {', '.join(changed)}"
                                           if changed else "byte-identical to adoption"))
        self.record_path.unlink()
        self._configured = False
        return [r for r in report if r]

    def _in_flight(self) -> tuple[dict[str, list[str]], str]:
        """The overlay's lines that carry a migration (redirects, routes through fed for a
        moving mailbox, mailboxes created here), per table; and a sentence counting the
        routine ones (physical address -> access address, colleagues on other systems
        through fed), which exist whenever the system is adopted."""
        adopted = self._read("list adopted", self.tables.adopted)
        book = self._read("read address book", lambda conn: {
            str(r["address"]) for r in conn.execute("SELECT address FROM address_book")})
        fed = self.tables.fed
        structural = {f"{self.tables.physical(a.mailbox_id)}\t{a.address}\n" for a in adopted}
        moving = {a.address for a in adopted if a.via_fed or a.redirect_to}
        lines: dict[str, list[str]] = {}
        routine = 0
        for name in ("virtual_alias", "virtual_mailbox", "transport"):
            data = self.host.read_file(self.tables.table_path(name)) or b""
            kept = []
            for line in data.decode("utf-8").splitlines(keepends=True):
                if line.startswith("#"):
                    continue
                key, _, value = line.rstrip("\n").partition("\t")
                if line in structural or (key in book and key not in moving and (
                        value == key or (name == "transport" and value == fed))):
                    routine += 1
                else:
                    kept.append(line)
            lines[name] = kept
        return lines, (f"overlay: {routine} routine line(s) removed (physical addresses, "
                       "colleagues on other systems through fed)")

    # -- accounts -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Learn the admin's mailboxes again; mailferry's marks on known ones are kept."""
        learned = self.learn()

        def change(conn: sqlite3.Connection) -> None:
            seen = []
            for m in learned.mailboxes:
                seen.append(m.mailbox_id)
                row = conn.execute("SELECT aliases, admin_aliases FROM adopted WHERE "
                                   "mailbox_id = ?", (m.mailbox_id,)).fetchone()
                aliases = list(m.aliases)
                if row is not None:  # aliases mailferry added stay
                    old_admin = set(json.loads(row["admin_aliases"]))
                    aliases += [a for a in json.loads(row["aliases"])
                                if a not in old_admin and a not in aliases]
                conn.execute(
                    "INSERT INTO adopted (mailbox_id, user, address, admin_aliases, aliases, "
                    "home) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mailbox_id) DO UPDATE SET "
                    "user = excluded.user, address = excluded.address, admin_aliases = "
                    "excluded.admin_aliases, aliases = excluded.aliases, home = excluded.home",
                    (m.mailbox_id, m.user, m.address, json.dumps(list(m.aliases)),
                     json.dumps(aliases), m.home))
            marks = ",".join("?" for _ in seen)
            # Gone from the admin's userdb, and no redirect of mailferry's pending on it.
            conn.execute(f"DELETE FROM adopted WHERE mailbox_id NOT IN ({marks}) "
                         "AND redirect_to IS NULL AND via_fed = 0", seen)
        self._write("learn the admin's mailboxes", change)

    def _adopted(self, mailbox_id: str) -> AdoptedRow | None:
        def query(conn: sqlite3.Connection) -> AdoptedRow | None:
            r = conn.execute("SELECT * FROM adopted WHERE mailbox_id = ?",
                             (mailbox_id,)).fetchone()
            return None if r is None else adopted_of(r)
        return self._read(f"get {mailbox_id}", query)

    def _adopted_account(self, a: AdoptedRow) -> Account:
        return Account(mailbox_id=a.mailbox_id, physical_address=self.tables.physical(
            a.mailbox_id), access_addresses=(a.address,), aliases=a.aliases,
            redirect_to=a.redirect_to, syncfed=a.syncfed)

    def list_accounts(self) -> list[Account]:
        """The admin's mailboxes (learned now) and the ones mailferry created here."""
        self.configure()
        self.refresh()
        adopted = self._read("list adopted", self.tables.adopted)
        return sorted([*super().list_accounts(), *map(self._adopted_account, adopted)],
                      key=lambda a: a.mailbox_id)

    def get_account(self, mailbox_id: str) -> Account | None:
        a = self._adopted(mailbox_id)
        return self._adopted_account(a) if a is not None else super().get_account(mailbox_id)

    def _update_adopted(self, mailbox_id: str, what: str, sql: str,
                        args: tuple[object, ...]) -> bool:
        """Change an adopted row; False if `mailbox_id` is not one (a created mailbox)."""
        if self._adopted(mailbox_id) is None:
            return False
        self._write(f"{what} of {mailbox_id}", lambda conn: conn.execute(
            sql + " WHERE mailbox_id = ?", (*args, mailbox_id)))
        return True

    def create_mailbox(
        self, mailbox_id: str, *, internal_address: str | None = None,
        access_addresses: tuple[str, ...] = (), redirect_to: str | None = None,
    ) -> Account:
        """An admin's mailbox is left as it is; any other is created in the overlay."""
        existing = self._adopted(mailbox_id)
        if existing is not None:
            return self._adopted_account(existing)
        return super().create_mailbox(mailbox_id, internal_address=internal_address,
                                      access_addresses=access_addresses,
                                      redirect_to=redirect_to)

    def set_addresses(self, mailbox_id: str, access_addresses: tuple[str, ...],
                      aliases: tuple[str, ...]) -> None:
        a = self._adopted(mailbox_id)
        if a is None:
            super().set_addresses(mailbox_id, access_addresses, aliases)
            return
        if tuple(access_addresses) != (a.address,):
            raise PermanentError(f"{self.name}: {mailbox_id} is the admin's mailbox of "
                                 f"{a.address}; mailferry does not change its address")
        self.check_international(None, aliases)  # the admin's mailbox gets mail as it did
        self._update_adopted(mailbox_id, "set aliases", "UPDATE adopted SET aliases = ?",
                             (json.dumps(list(aliases)),))

    def set_redirect(self, mailbox_id: str, target: str | None) -> None:
        if not self._update_adopted(mailbox_id, "set redirect",
                                    "UPDATE adopted SET redirect_to = ?", (target,)):
            super().set_redirect(mailbox_id, target)

    def set_via_fed(self, mailbox_id: str, value: bool) -> None:
        if not self._update_adopted(mailbox_id, "set via_fed", "UPDATE adopted SET via_fed = ?",
                                    (int(value),)):
            super().set_via_fed(mailbox_id, value)

    def set_syncfed(self, mailbox_id: str, value: bool) -> None:
        if not self._update_adopted(mailbox_id, "set syncfed", "UPDATE adopted SET syncfed = ?",
                                    (int(value),)):
            super().set_syncfed(mailbox_id, value)

    def delete_mailbox(self, mailbox_id: str) -> None:
        a = self._adopted(mailbox_id)
        if a is None:
            super().delete_mailbox(mailbox_id)
            return
        raise PermanentError(
            f"{self.name}: {a.address} is the admin's mailbox (Dovecot user {a.user}): "
            "mailferry does not delete it; remove it from your tables yourself (its mail "
            "already goes to the new mailbox), or set deleteSource: never")

    def _login(self, mailbox_id: str) -> ImapLogin:
        a = self._adopted(mailbox_id)
        login = super()._login(mailbox_id)
        return login if a is None else ImapLogin(a.user, login.password, login.master_user)
