"""Postfix + Dovecot systems as admins build them, for the adoption tests: not mailferry's layout.

`tests/pfdovecot.py`'s `MailHost` writes the layout mailferry's own driver expects; the hosts
here write what the guides and distributions give, with plain files, as an admin would:

- ``passwd`` (layout a): users as full addresses in a Dovecot passwd-file, homes at
  ``mail/DOMAIN/LOCAL``, the domain in ``virtual_mailbox_domains``, a ``hash:``
  ``virtual_mailbox_maps`` and a ``hash:`` ``virtual_alias_maps`` (an alias per user and a
  list alias);
- ``sql`` (layout b): users, domains and aliases in one SQLite database read by Dovecot's
  ``sql`` driver and by Postfix's ``sqlite:`` maps, Maildirs at ``vmail/DOMAIN/LOCAL``
  (``mail_location = maildir:~``). Aliases are in two tables, as admins split them: ``alias``
  (full address, ``WHERE address = '%s' AND active = 1``) and ``forward`` (local part and
  domain apart, ``WHERE local = '%u' AND domain = '%d'``), both in ``virtual_alias_maps``, and
  a third map whose query mailferry cannot read (``lower(address) = lower('%s')`` over
  ``extra``): its aliases are found through the spec's ``aliasCandidates`` file.

Both have what `reconcile adopt --check` asks an admin for (a Dovecot master user, the overlay
passdb/userdb lines, '=' among the username characters) unless built with ``ready=False``,
which the failure-path test uses. Listeners, queue and logs are `MailHost`'s (private
instance on 127.0.0.1, started and stopped by PID).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import sqlite3
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfdovecot import MAIL_USER, MAIN_CF, MASTER_CF, MASTER_USER, MailHost

DOVECOT_HEAD = """\
# the admin's Dovecot ({layout} layout)
instance_name = mf-{name}
base_dir = {root}/dovecot/run
state_dir = {root}/dovecot/state
protocols = imap lmtp
listen = {address}
log_path = {root}/dovecot/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_max_userip_connections = 100
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = {address}
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {address}
    port = {lmtp}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
"""

# What `reconcile adopt --check` tells the admin to add (docs/postfix-dovecot.md).
DOVECOT_FOR_MAILFERRY = """\
# added for mailferry (reconcile adopt --check): a master user, and mailferry's own
# passdb/userdb for the mailboxes it creates here
auth_username_chars = abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@=
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN username_format=%u {root}/dovecot/master-users
}}
passdb {{
  driver = passwd-file
  args = scheme=CRYPT username_format=%n {state}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {state}/passwd
}}
"""

PASSWD_DOVECOT = """\
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/dovecot/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/dovecot/users
}}
"""

SQL_DOVECOT = """\
mail_location = maildir:~
passdb {{
  driver = sql
  args = {root}/dovecot/sql.conf.ext
}}
userdb {{
  driver = sql
  args = {root}/dovecot/sql.conf.ext
}}
"""

SQL_CONF = """\
driver = sqlite
connect = {root}/maildb/mail.sqlite
default_pass_scheme = PLAIN
password_query = SELECT username AS user, password FROM mailbox WHERE username = '%u' AND active = 1
user_query = SELECT '{root}/vmail/' || domain || '/' || local AS home, {uid} AS uid, {gid} AS gid \\
  FROM mailbox WHERE username = '%u' AND active = 1
iterate_query = SELECT username AS user FROM mailbox WHERE active = 1
"""

SQL_SCHEMA = """
CREATE TABLE domain (domain TEXT PRIMARY KEY);
CREATE TABLE mailbox (username TEXT PRIMARY KEY, password TEXT NOT NULL, local TEXT NOT NULL,
                      domain TEXT NOT NULL, active INTEGER NOT NULL DEFAULT 1);
CREATE TABLE alias (address TEXT PRIMARY KEY, goto TEXT NOT NULL,
                    active INTEGER NOT NULL DEFAULT 1);
CREATE TABLE forward (local TEXT NOT NULL, domain TEXT NOT NULL, goto TEXT NOT NULL,
                      PRIMARY KEY (local, domain));
CREATE TABLE extra (address TEXT PRIMARY KEY, goto TEXT NOT NULL);
"""

SQL_MAPS = {
    "sqlite-domains.cf": "SELECT domain FROM domain WHERE domain = '%s'",
    "sqlite-mailboxes.cf": "SELECT domain || '/' || local || '/' FROM mailbox "
                           "WHERE username = '%s' AND active = 1",
    "sqlite-aliases.cf": "SELECT goto FROM alias WHERE address = '%s' AND active = 1",
    "sqlite-forwards.cf": "SELECT goto FROM forward\n  WHERE local = '%u' AND domain = '%d'",
    "sqlite-extra.cf": "SELECT goto FROM extra WHERE lower(address) = lower('%s')",
}


@dataclass
class AdminHost(MailHost):
    """A Postfix + Dovecot system in the admin's own layout (`passwd` or `sql`)."""

    layout: str = "passwd"
    users: tuple[str, ...] = ()  # full addresses
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> target(s), comma-separated
    forwards: dict[str, str] = field(default_factory=dict)  # sql: aliases in the forward table
    inactive: dict[str, str] = field(default_factory=dict)  # sql: alias rows with active = 0
    extra: dict[str, str] = field(default_factory=dict)  # sql: aliases behind sqlite-extra.cf
    alias_candidates: tuple[str, ...] = ()  # the spec's aliasCandidates file, when given
    ready: bool = True  # False: without what mailferry asks for (no master user ...)

    @property
    def etc(self) -> Path:
        return self.postfix_dir

    def admin_main_cf(self) -> str:
        etc, lmtp, address = self.etc, self.lmtp_port, self.address
        if self.layout == "passwd":
            return (f"virtual_mailbox_domains = {', '.join(self.domains)}\n"
                    f"virtual_mailbox_maps = hash:{etc}/vmailbox\n"
                    f"virtual_alias_maps = hash:{etc}/virtual\n"
                    f"virtual_transport = lmtp:inet:{address}:{lmtp}\n")
        return (f"virtual_mailbox_domains = sqlite:{etc}/sqlite-domains.cf\n"
                f"virtual_mailbox_maps = sqlite:{etc}/sqlite-mailboxes.cf\n"
                f"virtual_alias_maps = sqlite:{etc}/sqlite-aliases.cf, "
                f"sqlite:{etc}/sqlite-forwards.cf, sqlite:{etc}/sqlite-extra.cf\n"
                f"virtual_transport = lmtp:inet:{address}:{lmtp}\n")

    def write_config(self) -> None:
        user = pwd.getpwnam(MAIL_USER)
        for sub in ("postfix/etc", "postfix/spool", "dovecot/run", "dovecot/state",
                    "mailferry", "mferry-mail", "maildb"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for path in (self.root, self.root / "postfix", self.root / "dovecot",
                     self.root / "maildb"):
            path.chmod(0o755)
        shutil.chown(self.root / "postfix" / "spool", "root", "root")
        (self.root / "postfix" / "data").mkdir(exist_ok=True)
        shutil.chown(self.root / "postfix" / "data", "postfix", "postfix")
        os.chown(self.root / "mferry-mail", user.pw_uid, user.pw_gid)
        values = {"name": self.name, "root": self.root, "smtp": self.smtp_port,
                  "lmtp": self.lmtp_port, "imap": self.imap_port, "uid": user.pw_uid,
                  "gid": user.pw_gid, "state": self.state_dir, "layout": self.layout,
                  "address": self.address, "networks": self.networks}
        main = MAIN_CF.format(**values).replace("# generated by tests/pfdovecot.py",
                                                "# the admin's main.cf")
        (self.etc / "main.cf").write_text(main + self.admin_main_cf())
        (self.etc / "master.cf").write_text(MASTER_CF.format(**values))
        conf = DOVECOT_HEAD.format(**values)
        conf += (PASSWD_DOVECOT if self.layout == "passwd" else SQL_DOVECOT).format(**values)
        if self.ready:
            conf += DOVECOT_FOR_MAILFERRY.format(**values)
        self.dovecot_conf.write_text(conf)
        master_users = self.root / "dovecot" / "master-users"
        master_users.write_text(f"{MASTER_USER}:{{PLAIN}}{self.master_password}\n")
        master_users.chmod(0o644)
        self.password_file.write_text(self.master_password + "\n")
        self.password_file.chmod(0o600)
        if self.layout == "passwd":
            self._write_passwd_layout(user.pw_uid, user.pw_gid)
        else:
            self._write_sql_layout(user.pw_uid, user.pw_gid, values)

    def _write_passwd_layout(self, uid: int, gid: int) -> None:
        lines, boxes = [], []
        for address in self.users:
            local, domain = address.split("@")
            home = self.root / "mail" / domain / local
            lines.append(f"{address}:{{PLAIN}}pw-{local}:{uid}:{gid}::{home}::\n")
            boxes.append(f"{address}\t{domain}/{local}/\n")
        (self.root / "dovecot" / "users").write_text("".join(lines))
        (self.etc / "vmailbox").write_text("".join(boxes))
        (self.etc / "virtual").write_text(
            "".join(f"{a}\t{t}\n" for a, t in self.aliases.items()))
        for name in ("vmailbox", "virtual"):
            # on the host (inet_interfaces names its address: postmap checks it)
            subprocess.run([*self.wrap, "postmap", "-c", str(self.etc),
                            f"hash:{self.etc}/{name}"], check=True, timeout=60)
        (self.root / "mail").mkdir(exist_ok=True)
        os.chown(self.root / "mail", uid, gid)

    def _write_sql_layout(self, uid: int, gid: int, values: dict[str, Any]) -> None:
        db = self.root / "maildb" / "mail.sqlite"
        with sqlite3.connect(db) as conn:
            conn.executescript(SQL_SCHEMA)
            conn.executemany("INSERT INTO domain VALUES (?)", [(d,) for d in self.domains])
            conn.executemany("INSERT INTO mailbox (username, password, local, domain) "
                             "VALUES (?, ?, ?, ?)",
                             [(a, f"pw-{a.split('@')[0]}", *a.split("@")) for a in self.users])
            conn.executemany("INSERT INTO alias (address, goto) VALUES (?, ?)",
                             list(self.aliases.items()))
            conn.executemany("INSERT INTO alias VALUES (?, ?, 0)", list(self.inactive.items()))
            conn.executemany("INSERT INTO extra VALUES (?, ?)", list(self.extra.items()))
            conn.executemany("INSERT INTO forward VALUES (?, ?, ?)",
                             [(*a.split("@"), t) for a, t in self.forwards.items()])
        conn.close()
        db.chmod(0o644)
        for name, query in SQL_MAPS.items():
            (self.etc / name).write_text(f"# the admin's {name}\ndbpath = {db}\n"
                                         f"query = {query}\n")
        sql_conf = self.root / "dovecot" / "sql.conf.ext"
        sql_conf.write_text(SQL_CONF.format(**values))
        sql_conf.chmod(0o600)
        (self.root / "vmail").mkdir(exist_ok=True)
        os.chown(self.root / "vmail", uid, gid)

    # -- what a test reads back -----------------------------------------------------------
    def admin_files(self) -> dict[str, str]:
        """SHA-256 of every file the admin wrote (the adoption must leave them as they are)."""
        found: dict[str, str] = {}
        for base in (self.etc, self.root / "dovecot", self.root / "maildb"):
            for path in sorted(base.iterdir()):
                if path.is_file() and not path.name.endswith(".log"):
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found

    def message_ids(self, mailbox_id: str) -> Counter[str]:
        """Message-ID -> copies over every folder of a Dovecot user (any userdb)."""
        try:
            out = self.doveadm("fetch", "-u", mailbox_id, "hdr.message-id", "mailbox", "*")
        except RuntimeError:
            return Counter()
        found: Counter[str] = Counter()
        for line in out.splitlines():
            line = line.strip()
            if line.lower().startswith("hdr.message-id:"):
                line = line.split(":", 1)[1].strip()
            if line.startswith("<"):
                found[line] += 1
        return found

    def spec_document(self) -> dict[str, Any]:
        doc = super().spec_document()
        box = doc["spec"]["postfixDovecot"]
        box["adopt"] = True
        box["mailRoot"] = str(self.root / "mferry-mail")
        if self.alias_candidates:
            listed = self.root / "alias-candidates.txt"  # with the specs, not on the host
            listed.write_text("# addresses to ask the maps mailferry cannot list\n"
                              + "".join(f"{a}\n" for a in self.alias_candidates))
            box["aliasCandidates"] = str(listed)
        return doc
