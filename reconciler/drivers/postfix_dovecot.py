"""Driver of a Postfix + Dovecot system: Postfix for SMTP and addresses, Dovecot for mailboxes.

How the system is shaped (docs/postfix-dovecot.md has the admin's side):

- **Mailboxes** are Dovecot accounts in a passwd-file (passdb + userdb) the driver rewrites
  atomically; the Dovecot user name is the mailbox id and the home is
  ``<mailRoot>/<mailbox id>``. fed delivers to a mailbox's *physical address*
  ``<id>@<system>.invalid`` over SMTP to Postfix, which hands it to Dovecot over LMTP
  (``virtual_mailbox_domains = <system>.invalid``). fed delivers to Postfix rather than to
  Dovecot's LMTP so that the redirects below, which live in Postfix, apply to fed's mail too.
- **Addresses and redirects** are Postfix virtual aliases (`pfdovecot_tables`): access
  addresses, aliases and the internal address map to the physical address; a redirect maps
  the physical address onward (E2: ``ADP2 -> ADP1``; E9: ``ADP1 -> ADP2``), so the real
  system redirects fed's deliveries *and* its own local users' mail.
- **Shared domains.** The system's mail domains (corp.example) are put in *no* Postfix
  address class (not mydestination, virtual_alias_domains, virtual_mailbox_domains nor
  relay_domains): Postfix then never answers "550 User unknown" for them. An address of
  such a domain that the alias map knows is delivered locally; every other one goes out
  through ``relayhost = fed``, which knows where that colleague lives now. The driver sets
  these parameters itself with ``postconf -e`` (and reloads Postfix) and refuses to run
  against a main.cf that still lists one of its domains in a local class.
- **Everything else** the patent needs of a system (contacts table TC, address book from
  down-sync, syncfed marker, diary) is in ``mailferry.db`` next to the tables: the system's
  own state, read back by this driver.
- **Data** (the mover, E23 sizes) goes over IMAP with the Dovecot master user
  (`imapstore`), whose password is read from its env/file reference at every login.

Errors: unreachable servers, refused logins, a failing `postmap`/`postconf`, a main.cf that
contradicts the shared-domain setup are TemporaryErrors naming the system and the reason: the
engine adds the address and step, keeps the migration's state and retries. E41's deletion is
only reached through the guarded step (`steps.cleanup`).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import shlex
import smtplib
import sqlite3
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mailferry.mail.tls import client_context, describe
from reconciler.drivers.accounts import SqliteAccountsMixin
from reconciler.drivers.base import (
    Account,
    DeliveryEndpoint,
    ImapAccount,
    MailboxInfo,
    MailSystemDriver,
    StoredMessage,
)
from reconciler.drivers.contacts import SqliteContactsMixin
from reconciler.drivers.hosts import Host, HostError, LocalHost
from reconciler.drivers.imapstore import (
    ImapLogin,
    ImapSession,
    greeting,
    imap_account,
    imap_session,
)
from reconciler.drivers.pfdovecot_tables import TableError, Tables
from reconciler.errors import PermanentError, TemporaryError
from reconciler.secrets import resolve
from reconciler.spec.model import Endpoint, PostfixDovecotOptions

T = TypeVar("T")
LOCAL_CLASSES = ("mydestination", "virtual_alias_domains", "virtual_mailbox_domains",
                 "relay_domains")


def _host_of(options: PostfixDovecotOptions) -> Host:
    """The machine the system's servers run on: over SSH when the spec names a host."""
    if options.host is None:
        return LocalHost()
    from reconciler.drivers.sshhost import shared_host  # only systems on other hosts need it

    return shared_host(options.host)


def _ping_smtp(system: str, what: str, endpoint: Endpoint, lmtp: bool, *,
               tls: str = "none", cafile: str | None = None) -> set[str]:
    """EHLO/LHLO (and with `tls` "starttls" the upgrade fed's deliveries will do, with the
    same certificate check); TemporaryError naming the system and the hop unless it works.
    The extensions the server names (upper case, after the upgrade)."""
    try:
        client = smtplib.LMTP if lmtp else smtplib.SMTP
        with client(endpoint.host, endpoint.port, timeout=10) as conn:
            code, msg = conn.ehlo()
            if code != 250:
                raise TemporaryError(f"{system}: {what} {endpoint} answered {code} {msg!r}")
            if tls == "starttls":
                if not conn.has_extn("starttls"):
                    raise TemporaryError(f"{system}: {what} {endpoint}: TLS required "
                                         "(smtpTls: starttls) but it offers no STARTTLS")
                try:
                    conn.starttls(context=client_context(cafile))
                except (OSError, ssl.SSLError) as exc:
                    raise TemporaryError(f"{system}: {what} {endpoint}: TLS handshake "
                                         f"failed: {describe(exc)}") from exc
                conn.ehlo()
            return {name.upper() for name in conn.esmtp_features}
    except (OSError, smtplib.SMTPException) as exc:
        raise TemporaryError(f"{system}: {what} {endpoint} unreachable: {exc}") from exc


class PostfixDovecotDriver(SqliteAccountsMixin, SqliteContactsMixin, MailSystemDriver):
    """Administer one Postfix + Dovecot system through its tables, postconf and IMAP."""

    def __init__(self, name: str, options: PostfixDovecotOptions, fed_smtp: Endpoint,
                 internal_domain: str, domains: tuple[str, ...], *,
                 host: Host | None = None) -> None:
        self.name = name
        self.host: Host = host or _host_of(options)  # where Postfix and Dovecot run
        self.options = options
        self.fed_smtp = fed_smtp
        self.internal_domain = internal_domain
        self.domains = domains
        self._tables: Tables | None = None
        self._configured = False
        self._config_changes: list[str] = []  # main.cf diffs not yet in an event

    # -- plumbing -------------------------------------------------------------------------
    @property
    def tables(self) -> Tables:
        """The account tables, made on first use (the mail user must exist)."""
        if self._tables is None:
            self._tables = Tables(Path(self.options.state_dir), self.name,
                                  self.options.postfix_config_dir, self.options.mail_root,
                                  *self._mail_user_ids(),
                                  dovecot_config=self.options.dovecot_config,
                                  host=self.host, tables_dir=self.options.tables_folder)
        return self._tables

    def _mail_user_ids(self) -> tuple[int, int]:
        """uid and gid of the mail user on the system's host (it must exist there)."""
        try:
            ids = self.host.user_ids(self.options.mail_user)
        except HostError as exc:
            raise TemporaryError(f"{self.name}: mail user: {exc}") from exc
        if ids is None:
            raise TemporaryError(f"{self.name}: mail user {self.options.mail_user!r} "
                                 f"does not exist on this host ({self.host.label})")
        return ids

    def _write(self, what: str, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run `change` in a table transaction; files and database move together."""
        self.configure()
        try:
            self.tables.repair()
            with self.tables.write() as conn:
                return change(conn)
        except TableError as exc:
            raise TemporaryError(f"{self.name}: {what}: {exc}") from exc
        except (OSError, sqlite3.Error) as exc:
            raise TemporaryError(f"{self.name}: {what}: {exc}") from exc

    def _read(self, what: str, query: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self.tables.read() as conn:
                return query(conn)
        except (OSError, sqlite3.Error) as exc:
            raise TemporaryError(f"{self.name}: {what}: {exc}") from exc

    def _run(self, argv: list[str], what: str, *, stdin: str | None = None) -> str:
        """A command on the system's host; a failure is temporary, naming system and host."""
        try:
            return self.host.run(argv, timeout=60,
                                 stdin=None if stdin is None else stdin.encode())
        except HostError as exc:
            raise TemporaryError(f"{self.name}: {what}: {exc}") from exc

    def _login(self, mailbox_id: str) -> ImapLogin:
        master = self.options.master
        return ImapLogin(mailbox_id, lambda: resolve(
            master.password, what=f"{self.name} IMAP master user {master.user}"), master.user)

    def _imap(self, mailbox_id: str, what: str, fn: Callable[[ImapSession], T]) -> T:
        if self.get_account(mailbox_id) is None:
            raise PermanentError(f"{self.name}: no mailbox {mailbox_id} ({what})")
        imap = self.options.imap
        with imap_session(imap.host, imap.port, self.options.imap_tls,
                          self._login(mailbox_id), system=self.name,
                          cafile=self.options.imap_cafile) as session:
            return fn(session)

    def imap_account(self, mailbox_id: str) -> ImapAccount:
        """Dovecot IMAP with the master user on behalf of the mailbox: the data mover copies
        this system's mailboxes over its pipelined client, not message by message."""
        if self.get_account(mailbox_id) is None:
            raise PermanentError(f"{self.name}: no mailbox {mailbox_id} (copy)")
        imap = self.options.imap
        return imap_account(imap.host, imap.port, self.options.imap_tls,
                            self._login(mailbox_id), system=self.name,
                            cafile=self.options.imap_cafile)

    def dovecot_direct_config(self) -> str | None:
        """Dovecot's configuration file when the mover may write big messages into this
        system's Maildirs itself (`directMaildirWrites`, Dovecot on this machine), else
        None (every message over IMAP)."""
        if self.options.direct_maildir_writes and self.options.host is None:
            return self.options.dovecot_config
        return None

    # -- configuration: the shared-domain setup -------------------------------------------
    def wanted_postfix(self) -> dict[str, str]:
        """The main.cf parameters this driver owns, and their values."""
        state, lmtp, fed = self.options.tables_folder, self.options.lmtp, self.fed_smtp
        return {
            "virtual_alias_maps": f"hash:{state}/virtual_alias",
            "virtual_alias_domains": "",
            "virtual_mailbox_domains": f"{self.name}.invalid",
            "virtual_mailbox_maps": f"hash:{state}/virtual_mailbox",
            "virtual_transport": f"lmtp:[{lmtp.host}]:{lmtp.port}",
            "relayhost": f"[{fed.host}]:{fed.port}",
        }

    def _postconf(self, names: list[str], *, expand: bool = False) -> list[str]:
        argv = ["postconf", "-c", self.options.postfix_config_dir, "-h"]
        argv += ["-x"] if expand else []
        return self._run(argv + names, "postconf").splitlines()

    def configure(self) -> None:
        """Check the system, then set the routing parameters in main.cf (reload if changed).

        Nothing is written before every check passed: a refusal leaves main.cf, master.cf,
        the maps and Dovecot's files as they were. A change is journalled for the admin
        (``<stateDir>/postconf-changes.log``: the ``postconf -n`` diff and the ``postconf
        -e`` that undoes it) and handed to the engine for the step's event
        (`take_config_changes`). If Postfix does not take a value (an override elsewhere),
        main.cf gets its old bytes back and the step waits with the reason."""
        if self._configured:
            return
        problems = self.check_config()
        if problems:
            raise TemporaryError(f"{self.name}: configuration refused: " + "; ".join(problems))
        wanted = self.wanted_postfix()
        current = dict(zip(wanted, self._postconf(list(wanted)), strict=False))
        changes = {k: v for k, v in wanted.items() if current.get(k, "").strip() != v}
        if changes:  # a host with sudo: every privileged command allowed, or none run
            config_dir = self.options.postfix_config_dir
            refused = self.host.refused([
                ["postconf", "-c", config_dir, "-e", *(f"{k}={v}" for k, v in changes.items())],
                ["postfix", "-c", config_dir, "reload"]])
            if refused:
                raise TemporaryError(f"{self.name}: not allowed on {self.host.label}, nothing "
                                     "changed: " + "; ".join(refused))
        with contextlib.suppress(TemporaryError):  # unreachable: the safe choice stays
            self.tables.unicode_keys = "SMTPUTF8" in self._lmtp_extensions()
        self.tables.repair()  # the maps must exist before Postfix is pointed at them
        if changes:
            config_dir = self.options.postfix_config_dir
            main_cf = f"{config_dir.rstrip('/')}/main.cf"
            try:
                saved = self.host.read_file(main_cf)
            except HostError as exc:
                raise TemporaryError(f"{self.name}: read main.cf: {exc}") from exc
            if saved is None:
                raise TemporaryError(f"{self.name}: {main_cf} does not exist "
                                     f"({self.host.label})")
            before = self._run(["postconf", "-c", config_dir, "-n"], "postconf -n")
            self._run(["postconf", "-c", config_dir, "-e",
                       *(f"{k}={v}" for k, v in changes.items())], "postconf -e")
            got = dict(zip(wanted, self._postconf(list(wanted)), strict=False))
            wrong = [f"{k} is {got.get(k, '').strip()!r} after postconf -e, expected {v!r}"
                     for k, v in wanted.items() if got.get(k, "").strip() != v]
            if wrong:
                self.host.replace_file(main_cf, saved)  # back to the admin's bytes
                raise TemporaryError(f"{self.name}: configuration refused: " + "; ".join(wrong))
            after = self._run(["postconf", "-c", config_dir, "-n"], "postconf -n")
            self._journal(before, after, {k: current.get(k, "").strip() for k in changes})
            self._run(["postfix", "-c", config_dir, "reload"], "postfix reload")
        self._configured = True

    def _journal(self, before: str, after: str, old: dict[str, str]) -> None:
        """Record a main.cf change where the admin finds it, with the command undoing it."""
        diff = "".join(difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True),
            "postconf -n (before mailferry)", "postconf -n (after mailferry)"))
        # Parameters the admin had set get their value back; the others lose ours (-X).
        explicit = {line.split("=", 1)[0].strip() for line in before.splitlines()}
        config_dir = self.options.postfix_config_dir
        undo = " && ".join(shlex.join(argv) for argv in (
            ["postconf", "-c", config_dir, "-e",
             *(f"{k}={v}" for k, v in old.items() if k in explicit)],
            ["postconf", "-c", config_dir, "-X", *(k for k in old if k not in explicit)],
        ) if len(argv) > 4)
        if self.options.host is not None:  # run where main.cf is
            undo = shlex.join(["ssh", self.options.host.url, undo])
        self._config_changes.append(f"{diff}undo: {undo}\n")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        state = Path(self.options.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        with open(state / "postconf-changes.log", "a", encoding="utf-8") as log:
            log.write(f"# {stamp} mailferry changed main.cf of {self.name}\n{diff}"
                      f"# undo: {undo}\n")

    def take_config_changes(self) -> list[str]:
        """The configuration changes made since the last call (for the step's event)."""
        changes, self._config_changes = self._config_changes, []
        return changes

    def check_config(self) -> list[str]:
        """What in main.cf or Dovecot's configuration the driver cannot work with (empty:
        fine). Reads only: run before anything is changed."""
        problems = []
        # virtual_alias_domains and virtual_mailbox_domains are the driver's (set below):
        # only the classes it leaves to the admin must not claim its domains.
        admin_classes = [c for c in LOCAL_CLASSES if c not in self.wanted_postfix()]
        values = self._postconf(admin_classes, expand=True)
        ours = {*self.domains, self.internal_domain}
        for name, value in zip(admin_classes, values, strict=False):
            listed = {v.strip().lower() for v in value.replace(",", " ").split()}
            clash = sorted(ours & listed)
            if clash:
                problems.append(f"{name} lists {', '.join(clash)}: Postfix would answer 550 "
                                "for that domain's addresses hosted on other systems; remove it")
        dovecot = self.options.dovecot_config
        chars = self._run(["doveconf", "-c", dovecot, "-h", "auth_username_chars"],
                          "doveconf").strip()
        if chars and "=" not in chars:
            problems.append("Dovecot's auth_username_chars lacks '=' (mailbox ids are "
                            "local=domain)")
        passwd = f"{self.options.tables_folder.rstrip('/')}/passwd"
        if passwd not in self._run(["doveconf", "-c", dovecot, "-n"], "doveconf -n"):
            problems.append(f"Dovecot's passdb/userdb do not read {passwd} (passwd-file)")
        return problems

    # -- health -------------------------------------------------------------------------
    def ping(self) -> None:
        """Postfix SMTP, Dovecot LMTP and IMAP answer, and the configuration is in place."""
        tls, cafile = self.options.smtp_tls, self.options.smtp_cafile
        _ping_smtp(self.name, "Postfix SMTP", self.options.smtp, lmtp=False, tls=tls,
                   cafile=cafile)
        _ping_smtp(self.name, "Dovecot LMTP", self.options.lmtp, lmtp=True, tls=tls,
                   cafile=cafile)
        imap = self.options.imap
        greeting(imap.host, imap.port, self.options.imap_tls, system=self.name,
                 cafile=self.options.imap_cafile)
        self.configure()

    def delivery_endpoint(self) -> DeliveryEndpoint:
        """fed delivers over SMTP to Postfix, so Postfix's redirects apply to its mail too."""
        return DeliveryEndpoint(self.options.smtp.host, self.options.smtp.port, "smtp",
                                tls=self.options.smtp_tls, cafile=self.options.smtp_cafile)

    # -- accounts -----------------------------------------------------------------------
    def create_mailbox(
        self, mailbox_id: str, *, internal_address: str | None = None,
        access_addresses: tuple[str, ...] = (), redirect_to: str | None = None,
    ) -> Account:
        """Dovecot account + Postfix routes unless present; an existing account is left as is."""
        if "/" in mailbox_id or ":" in mailbox_id or mailbox_id.startswith("."):
            raise PermanentError(f"{self.name}: mailbox id {mailbox_id!r} is not usable")
        self.check_international(mailbox_id, access_addresses)
        self._insert_account(f"create {mailbox_id}", mailbox_id, internal_address,
                             access_addresses, redirect_to)
        account = self.get_account(mailbox_id)
        assert account is not None
        return account

    def set_addresses(
        self, mailbox_id: str, access_addresses: tuple[str, ...], aliases: tuple[str, ...]
    ) -> None:
        """The mixin's, once the system can take every address (`check_international`)."""
        self.check_international(mailbox_id, (*access_addresses, *aliases))
        super().set_addresses(mailbox_id, access_addresses, aliases)

    def check_international(self, mailbox_id: str | None, addresses: tuple[str, ...]) -> None:
        """Refuse, before anything is written, what this Postfix + Dovecot would bounce.

        A UTF-8 local part (RFC 6531) reaches Postfix only with SMTPUTF8, so Postfix must
        offer it (``smtputf8_enable = yes``). A mailbox whose id is not ASCII also gets its
        mail from Postfix over LMTP with that id as the recipient: Postfix sends it only to
        an LMTP server that offers SMTPUTF8 (else it bounces, 5.6.7 "SMTPUTF8 is required"),
        and Dovecot must accept the id as a user name. Dovecot 2.3's LMTP offers no
        SMTPUTF8. An IDN domain alone needs none of this (ids and maps hold A-labels).
        TemporaryError naming the system, the reason and what to set. `mailbox_id` None:
        only the addresses (an adopted mailbox, which gets its mail as it always did)."""
        utf8 = [a for a in addresses if not a.rpartition("@")[0].isascii()]
        mailbox_id = mailbox_id or ""
        if not utf8 and mailbox_id.isascii():
            return
        problems = []
        enabled = self._postconf(["smtputf8_enable"], expand=True)
        if not enabled or enabled[0].strip().lower() not in ("yes", "true", "1"):
            problems.append(f"Postfix has smtputf8_enable = {(enabled or [''])[0].strip()!r} "
                            "(set smtputf8_enable = yes in main.cf, then postfix reload)")
        if not mailbox_id.isascii():
            if "SMTPUTF8" not in self._lmtp_extensions():
                problems.append(
                    f"Dovecot's LMTP at {self.options.lmtp} does not offer SMTPUTF8, so "
                    "Postfix would bounce every message for the mailbox (5.6.7 SMTPUTF8 is "
                    "required); Dovecot 2.3 "
                    "has none: use a Dovecot whose LMTP offers it (2.4 built with "
                    "--enable-experimental-mail-utf8, mail_utf8_extensions = yes)")
            chars = self._run(["doveconf", "-c", self.options.dovecot_config, "-h",
                               "auth_username_chars"], "doveconf").strip()
            if chars and not set(mailbox_id) <= set(chars):
                problems.append("Dovecot's auth_username_chars refuses the user name "
                                f"{mailbox_id!r} (set auth_username_chars = , empty: any)")
        if problems:
            what = ", ".join(utf8 or [mailbox_id])
            raise TemporaryError(f"{self.name}: cannot host {what} (a UTF-8 local part, "
                                 "RFC 6531), nothing changed: " + "; ".join(problems))

    def _lmtp_extensions(self) -> set[str]:
        """What Dovecot's LHLO offers (as fed's and the ping's connection sees it)."""
        return _ping_smtp(self.name, "Dovecot LMTP", self.options.lmtp, lmtp=True,
                          tls=self.options.smtp_tls, cafile=self.options.smtp_cafile)

    def set_via_fed(self, mailbox_id: str, value: bool) -> None:
        """Leave the mailbox's access addresses and aliases to relayhost = fed (or not)."""
        self._update(mailbox_id, "set via_fed", "UPDATE accounts SET via_fed = ?", (int(value),))

    def queued_for(self, address: str) -> int:
        """Messages in Postfix's queue still addressed to `address` (postqueue -j)."""
        out = self._run(["postqueue", "-c", self.options.postfix_config_dir, "-j"], "postqueue")
        count = 0
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                rcpts = [r.get("address", "") for r in entry.get("recipients", [])]
                count += sum(1 for r in rcpts if r.lower() == address.lower())
        return count

    def delete_mailbox(self, mailbox_id: str) -> None:
        """Routes, Dovecot account, home and diary gone (E41, only from the guarded step).

        Refused while Postfix still holds mail for the mailbox (Dovecot down, say): that mail
        was aliased at enqueue time and would bounce once the account is gone."""
        home = self.tables.home(mailbox_id)
        waiting = self.queued_for(self.tables.physical(mailbox_id))
        if waiting:
            raise TemporaryError(f"{self.name}: {waiting} message(s) still queued in Postfix "
                                 f"for {mailbox_id}; not deleting it yet", delay=30)

        def change(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM accounts WHERE mailbox_id = ?", (mailbox_id,))
            conn.execute("DELETE FROM diary WHERE mailbox_id = ?", (mailbox_id,))
            # The files are rewritten before the commit; the data goes with them, so a
            # crash before the commit re-creates routes to an empty home, never the reverse.
            self.tables.install(conn)
            self.host.remove_tree(str(home), as_user=self.options.mail_user)
        self._write(f"delete {mailbox_id}", change)

    # -- data -----------------------------------------------------------------------------
    def mailbox_info(self, mailbox_id: str) -> MailboxInfo:
        """Type "dovecot-maildir", bytes and messages over every folder (IMAP sizes)."""
        size, count = self._imap(mailbox_id, "size", lambda s: s.size())
        return MailboxInfo("dovecot-maildir", size, count)

    def list_folders(self, mailbox_id: str) -> list[str]:
        """INBOX and every folder."""
        return self._imap(mailbox_id, "folders", lambda s: s.folders())

    def create_folder(self, mailbox_id: str, folder: str) -> None:
        """Create a folder if missing (lets the mover keep empty folders)."""
        self._imap(mailbox_id, "create folder", lambda s: s.create(folder))

    def list_messages(self, mailbox_id: str, folder: str) -> list[StoredMessage]:
        """Every message of a folder, hashed."""
        return self._imap(mailbox_id, f"list {folder}", lambda s: s.messages(folder))

    def read_message(self, mailbox_id: str, folder: str, key: str) -> bytes:
        """Exact bytes of one message."""
        return self._imap(mailbox_id, f"read {folder}", lambda s: s.read(folder, key))

    def append_message(
        self, mailbox_id: str, folder: str, data: bytes, *, flags: str = "",
        internal_date: float | None = None,
    ) -> str:
        """IMAP APPEND with flags and INTERNALDATE."""
        return self._imap(mailbox_id, f"append to {folder}",
                          lambda s: s.append(folder, data, flags, internal_date))

    def read_diary(self, mailbox_id: str) -> bytes | None:
        """The diary kept in mailferry.db (Dovecot has no calendar store), or None."""
        row = self._read(f"read diary of {mailbox_id}", lambda conn: conn.execute(
            "SELECT data FROM diary WHERE mailbox_id = ?", (mailbox_id,)).fetchone())
        return None if row is None else bytes(row["data"])

    def write_diary(self, mailbox_id: str, data: bytes) -> None:
        """Replace the diary."""
        self._write(f"write diary of {mailbox_id}", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO diary (mailbox_id, data) VALUES (?, ?)", (mailbox_id, data)))
