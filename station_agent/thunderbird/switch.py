"""Pointing one Thunderbird account at the new system, testing-ready, with a way back (E30-E33).

Why only one account. A real profile holds several accounts (the work one, a private one,
Local Folders) and several SMTP servers. The patent changes "the parameterization" of the
migrating mailbox; touching anything else would break mail the migration has nothing to do
with. The account is the one with an identity whose e-mail is the migrating address
(`mail.accountmanager.accounts` -> `mail.account.accountN.{server,identities}` ->
`mail.identity.idN.useremail`); that identity's SMTP server is `mail.identity.idN.smtpServer`
(or `mail.smtp.defaultserver`).

What the switch changes, and why:
- `mail.server.serverN.{hostname,realhostname,port,type,userName,realuserName,socketType,
  authMethod}`: the new IMAP server (socketType 0 plain, 2 STARTTLS, 3 TLS; authMethod 3 =
  normal password). The server *key* stays, so filters, the account order and the account's
  name are kept.
- `directory`, `directory-rel` and the cached IMAP `namespace.*` of that server are dropped:
  Thunderbird then makes a fresh cache folder for the new host instead of mixing the old
  server's cached messages (other UIDs) with the new ones.
- Folder URIs that name the old server (`imap://user@old-host/Sent` in the identity's
  `fcc_folder`, `draft_folder`, `archive_folder`, ... and the server's own prefs) are
  rewritten to the new server, or sent mail would be filed into a server that no longer exists.
- The identity's SMTP server gets the new host, port, user and `try_ssl`. If another
  identity uses the same SMTP entry, a new `smtpK` entry is created for ours instead, so the
  other account keeps sending through the old server.

The way back. Before the first change, prefs.js is copied to `prefs.js.mailferry-backup`
(atomically, and only if no backup exists: a second attempt after a crash must not back up
an already-switched file). Every switch is derived from the backup, so switching twice gives
the same file. A rollback (E32) copies the backup back byte-for-byte; E33 deletes it. Nothing
is touched while Thunderbird runs: it rewrites prefs.js when it exits and would undo us.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from station_agent.fsutil import atomic_write, fsync_dir
from station_agent.thunderbird.prefs import Prefs, PrefsError

BACKUP_NAME = "prefs.js.mailferry-backup"
SOCKET_TYPES = {"none": 0, "starttls": 2, "tls": 3}
AUTH_PASSWORD = 3


class SwitchError(Exception):
    """The profile cannot be switched (no such account, unreadable prefs.js, ...)."""


@dataclass(frozen=True)
class Endpoint:
    """A server the switched account must use."""

    host: str
    port: int
    tls: str = "none"  # none | starttls | tls

    def describe(self) -> str:
        return f"{self.host}:{self.port}" + ("" if self.tls == "none" else f" ({self.tls})")


@dataclass(frozen=True)
class Account:
    """Where the migrating address lives in a profile."""

    account: str
    server: str
    identity: str
    smtp: str | None
    address: str
    server_type: str
    hostname: str
    port: int
    username: str

    def settings(self, prefs: Prefs) -> dict[str, Any]:
        """The account's IMAP/POP and SMTP settings, for reports and logs."""
        out: dict[str, Any] = {"account": self.account, "type": self.server_type,
                               "host": self.hostname, "port": self.port,
                               "user": self.username}
        if self.smtp:
            base = f"mail.smtpserver.{self.smtp}."
            out["smtp"] = {"key": self.smtp, "host": prefs.get_str(base + "hostname"),
                           "port": prefs.get_int(base + "port", 0)}
        return out


def backup_path(profile_dir: Path) -> Path:
    """Where the old prefs.js is kept until E33."""
    return profile_dir / BACKUP_NAME


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def find_account(prefs: Prefs, address: str) -> Account:
    """The mail account whose identity sends as `address`; SwitchError if none or several."""
    wanted = address.strip().lower()
    found: list[Account] = []
    for account in _csv(prefs.get_str("mail.accountmanager.accounts")):
        server = prefs.get_str(f"mail.account.{account}.server")
        for identity in _csv(prefs.get_str(f"mail.account.{account}.identities")):
            if prefs.get_str(f"mail.identity.{identity}.useremail").strip().lower() != wanted:
                continue
            base = f"mail.server.{server}."
            kind = prefs.get_str(base + "type")
            if kind in ("none", "rss", "nntp", ""):
                continue  # Local Folders, feeds, news: not a mailbox account
            smtp = (prefs.get_str(f"mail.identity.{identity}.smtpServer")
                    or prefs.get_str("mail.smtp.defaultserver") or None)
            found.append(Account(
                account=account, server=server, identity=identity, smtp=smtp,
                address=wanted, server_type=kind,
                hostname=prefs.get_str(base + "realhostname") or prefs.get_str(base + "hostname"),
                port=prefs.get_int(base + "port", 0),
                username=prefs.get_str(base + "realuserName") or prefs.get_str(base + "userName")))
    if not found:
        raise SwitchError(f"no mail account of the profile sends as {address}")
    if len(found) > 1:
        raise SwitchError(f"{len(found)} accounts of the profile send as {address} "
                          f"({', '.join(a.account for a in found)}): cannot tell which to move")
    return found[0]


def server_dir(prefs: Prefs, server: str, profile_dir: Path) -> Path:
    """Where Thunderbird keeps server `server`'s mail (mbox store, or IMAP cache).

    `directory-rel` (`[ProfD]...`) wins over the absolute `directory`, as in Thunderbird;
    with neither, its default: `Mail/<host>` (POP3, Local Folders) or `ImapMail/<host>`.
    """
    base = f"mail.server.{server}."
    rel = prefs.get_str(base + "directory-rel")
    if rel.startswith("[ProfD]"):
        return profile_dir / rel[len("[ProfD]"):]
    absolute = prefs.get_str(base + "directory")
    if absolute:
        return Path(absolute)
    root = "ImapMail" if prefs.get_str(base + "type") == "imap" else "Mail"
    return profile_dir / root / (prefs.get_str(base + "hostname") or server)


def local_folders_dir(prefs: Prefs, profile_dir: Path) -> Path | None:
    """The Local Folders directory (the account of type "none"), or None."""
    for key in prefs.keys("mail.server."):
        if key.endswith(".type") and prefs.get_str(key) == "none":
            return server_dir(prefs, key.split(".")[2], profile_dir)
    return None


def pop3_mail(prefs: Prefs, profile_dir: Path, address: str) -> tuple[Path, str] | None:
    """(mbox folder, account name) of the migrating account if it is POP3, else None.

    A POP3 account keeps the only copy of its mail in its own folder (`Mail/<server>/`:
    Inbox, Sent, its subfolders) unless it hands its mail to Local Folders' Inbox
    (`deferred_to_account`, the "global inbox"), where Local Folders' upload takes it.
    """
    account = find_account(prefs, address)
    if account.server_type != "pop3":
        return None
    base = f"mail.server.{account.server}."
    if prefs.get_str(base + "deferred_to_account"):
        return None
    name = prefs.get_str(base + "name") or account.address
    return server_dir(prefs, account.server, profile_dir), name


def _uri_base(kind: str, user: str, host: str) -> str:
    scheme = {"imap": "imap", "pop3": "mailbox"}.get(kind, kind)
    return f"{scheme}://{quote(user, safe='')}@{host}"


# scheme://user@host[:port] followed by the end, a path or a separator. The user part may
# itself hold a raw '@' (`alice@corp.example@host`) or be percent-encoded (`alice%40...`).
_URI = re.compile(r"(?P<scheme>imap|mailbox|pop3)://(?P<user>[^/@\s\"',]*(?:@[^/@\s\"',]*)?)"
                  r"@(?P<host>[^/:@\s\"',?#]+)(?::\d+)?(?=$|[/?#\s\"',;])", re.IGNORECASE)


def rewrite_uris(prefs: Prefs, account: Account, new_uri: str) -> list[str]:
    """Point every pref naming the account's old server at `new_uri`; the keys changed.

    Thunderbird names a server and its folders by URI in many prefs, not only the account's
    own: `spamActionTargetAccount` holds the bare server URI (`imap://alice%40corp@host`,
    written on the first run), `spamActionTargetFolder`, the identity's `fcc_folder` etc. a
    folder URI, and another account may file its junk or sent mail into this one. A pref
    still naming the old host after the switch makes Thunderbird talk to a server that is
    gone (and it does not repair it), so every pref is looked at, and a URI counts as the
    old server's when its host and its (percent-decoded) user are the account's, in any
    case and spelling. URIs of other users or hosts are left alone.
    """
    user, host = account.username.lower(), account.hostname.lower()

    def replace(match: re.Match[str]) -> str:
        if match.group("host").lower() != host or \
                unquote(match.group("user")).lower() != user:
            return match.group(0)
        return new_uri

    changed: list[str] = []
    for key in prefs.keys(""):
        value = prefs.get(key)
        if not isinstance(value, str) or "://" not in value:
            continue
        new_value = _URI.sub(replace, value)
        if new_value != value:
            prefs.set(key, new_value)
            changed.append(key)
    return changed


def _smtp_shared(prefs: Prefs, smtp: str, identity: str) -> bool:
    """True if an identity other than `identity` sends through SMTP entry `smtp`."""
    default = prefs.get_str("mail.smtp.defaultserver")
    for account in _csv(prefs.get_str("mail.accountmanager.accounts")):
        for other in _csv(prefs.get_str(f"mail.account.{account}.identities")):
            if other == identity:
                continue
            used = prefs.get_str(f"mail.identity.{other}.smtpServer") or default
            if used == smtp:
                return True
    return False


def load(profile_dir: Path) -> Prefs:
    """The profile's prefs.js, parsed; SwitchError if it cannot be read."""
    try:
        return Prefs.load(profile_dir / "prefs.js")
    except PrefsError as exc:
        raise SwitchError(str(exc)) from None


def switch(profile_dir: Path, address: str, *, imap: Endpoint, smtp: Endpoint,
           username: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Back up prefs.js (once) and point the account of `address` at the new servers."""
    prefs_path = profile_dir / "prefs.js"
    backup = backup_path(profile_dir)
    if backup.exists():
        original = backup.read_bytes()  # an earlier attempt's backup is the true original
    else:
        try:
            original = prefs_path.read_bytes()
        except OSError as exc:
            raise SwitchError(f"{prefs_path}: cannot read: {exc.strerror or exc}") from None
        find_account(_parse(original, prefs_path), address)  # never back up a useless file
        atomic_write(backup, original)
    prefs = _parse(original, backup)
    account = find_account(prefs, address)
    old = account.settings(prefs)

    base = f"mail.server.{account.server}."
    new_uri = _uri_base("imap", username, imap.host)
    for key in ("hostname", "realhostname"):
        if key == "hostname" or key in prefs:
            prefs.set(base + key, imap.host)
    for key in ("userName", "realuserName"):
        if key == "userName" or key in prefs:
            prefs.set(base + key, username)
    prefs.set(base + "type", "imap")
    prefs.set(base + "port", imap.port)
    prefs.set(base + "socketType", SOCKET_TYPES[imap.tls])
    prefs.set(base + "authMethod", AUTH_PASSWORD)
    for key in prefs.keys(base):
        if key in (base + "directory", base + "directory-rel") or \
                key.startswith(base + "namespace."):
            prefs.delete(key)
    if account.server_type == "pop3":
        # A POP3 account can hand its mail to another account's Inbox; IMAP cannot.
        prefs.delete(base + "deferred_to_account")
    rewrite_uris(prefs, account, new_uri)

    smtp_key = account.smtp
    if smtp_key is None or _smtp_shared(prefs, smtp_key, account.identity):
        smtp_key = _new_smtp_key(prefs)
        prefs.set(f"mail.identity.{account.identity}.smtpServer", smtp_key)
    sbase = f"mail.smtpserver.{smtp_key}."
    prefs.set(sbase + "hostname", smtp.host)
    prefs.set(sbase + "port", smtp.port)
    prefs.set(sbase + "username", username)
    prefs.set(sbase + "try_ssl", SOCKET_TYPES[smtp.tls])
    prefs.set(sbase + "authMethod", AUTH_PASSWORD)
    if sbase + "description" not in prefs:
        prefs.set(sbase + "description", f"{smtp.host} (mailferry)")
    prefs.save(prefs_path)
    switched = find_account(prefs, address)
    return old, switched.settings(prefs)


def _new_smtp_key(prefs: Prefs) -> str:
    """A fresh `smtpK` key, registered in `mail.smtpservers`."""
    known = _csv(prefs.get_str("mail.smtpservers"))
    numbers = [int(k[4:]) for k in known + [key.split(".")[2] for key in
                                             prefs.keys("mail.smtpserver.")]
               if k.startswith("smtp") and k[4:].isdigit()]
    key = f"smtp{max(numbers, default=0) + 1}"
    prefs.set("mail.smtpservers", ",".join([*known, key]))
    return key


def _parse(data: bytes, source: Path) -> Prefs:
    try:
        return Prefs(data.decode("utf-8"))
    except (UnicodeDecodeError, PrefsError) as exc:
        raise SwitchError(f"{source}: {exc}") from None


def rollback(profile_dir: Path) -> bool:
    """Put the old prefs.js back byte-for-byte and drop the backup; False if none."""
    backup = backup_path(profile_dir)
    if not backup.exists():
        return False
    atomic_write(profile_dir / "prefs.js", backup.read_bytes())
    # The backup goes only once the restore is on disk: a crash in between leaves two
    # identical files, which the next attempt treats as a fresh start.
    remove_backup(profile_dir)
    return True


def remove_backup(profile_dir: Path) -> bool:
    """Delete the old parameterization (E33); False if it was already gone."""
    backup = backup_path(profile_dir)
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()
        fsync_dir(profile_dir)
        return True
    return False


def remove_old_store(profile_dir: Path, address: str) -> tuple[list[Path], str | None]:
    """E33: delete the switched account's old folder; (paths removed, why kept if kept).

    The old folder is what the backup's prefs name for the account: the IMAP cache
    `ImapMail/<old host>` (copies of the old server's mail, now useless and taking disk)
    or the POP3 account's mbox files `Mail/<pop server>` (uploaded by E30; kept until this
    cleanup so a help desk can still put the user back). Its `.msf` summary beside it goes
    too. Kept, with the reason, when the current prefs.js still uses that folder -- a help
    desk copied the backup back, or another account shares it -- or when it is not inside
    the profile (never delete what we did not find there). Called before `remove_backup`:
    the backup is what names the folder, and a crash in between only repeats the removal.
    """
    backup = backup_path(profile_dir)
    if not backup.exists():
        return [], None
    old_prefs = _parse(backup.read_bytes(), backup)
    try:
        account = find_account(old_prefs, address)
    except SwitchError as exc:
        return [], str(exc)
    old_dir = server_dir(old_prefs, account.server, profile_dir)
    current = load(profile_dir)
    for key in current.keys("mail.server."):
        if key.endswith(".type"):
            other = key.split(".")[2]
            if _same_path(server_dir(current, other, profile_dir), old_dir):
                return [], f"{old_dir} is still used by mail.server.{other}"
    try:
        old_dir.resolve().relative_to(profile_dir.resolve())
    except ValueError:
        return [], f"{old_dir} is outside the profile"
    removed: list[Path] = []
    for path in (old_dir, old_dir.with_name(old_dir.name + ".msf")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(path)
        elif path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    if removed:
        fsync_dir(old_dir.parent)
    return removed, None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))
