"""The mail clients the agent can switch: one interface, a Thunderbird and a JSON implementation.

Why an interface. The agent's steps (check, upload, switch, test, roll back, clean up) are
the same for every mail client; what differs is where the client keeps its settings and
local mail and how it shows it is running. `MailClient` is that difference. `Thunderbird`
is the real one (profiles.ini, prefs.js, the profile lock, Local Folders); `JsonProfile` is
the minimal JSON profile the end-to-end tests and the demo use (no IMAP: it names the target
system, mailbox and submission server).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from station_agent import localdata, profile
from station_agent.thunderbird import profiles, switch
from station_agent.thunderbird.switch import Endpoint

POP3_POLICIES = ("account", "merge")


class ClientError(Exception):
    """The client's settings cannot be read or switched."""


@dataclass(frozen=True)
class Target:
    """The new system as the station API describes it."""

    system: str
    mailbox: str
    smtp: Endpoint | None
    imap: Endpoint | None


class MailClient(Protocol):
    """What the agent needs from a mail client."""

    kind: str
    uses_imap: bool

    def running(self) -> str | None: ...
    def problem(self, address: str) -> str | None: ...
    def local_roots(self, address: str) -> list[tuple[Path, str]]: ...
    def switch(self, address: str, target: Target, username: str
               ) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def rollback(self) -> bool: ...
    def remove_backup(self) -> bool: ...
    def remove_old_data(self, address: str) -> tuple[list[Path], str | None]: ...
    def backup_path(self) -> Path: ...


def _archive_roots(archives: list[Path]) -> list[tuple[Path, str]]:
    # Each archive folder becomes its own subtree, so its names cannot collide with
    # Local Folders' own (both may have an "Inbox").
    return [(root, f"{localdata.LOCAL_ROOT}/{root.name or 'Archive'}") for root in archives]


class JsonProfile:
    """The simple JSON profile (`{"account": {...}}`), see `profile.py`."""

    kind = "json"
    uses_imap = False

    def __init__(self, path: Path, local_mail: Path | None, archives: list[Path]) -> None:
        self.path = path
        self.local_mail = local_mail
        self.archives = archives

    def running(self) -> str | None:
        lock = profile.client_lock(self.path)
        return None if lock is None else f"the mail client is running (lock file {lock})"

    def problem(self, address: str) -> str | None:
        try:
            profile.load_account(self.path)
        except profile.ProfileError as exc:
            return f"profile unreadable: {exc}"
        return None

    def local_roots(self, address: str) -> list[tuple[Path, str]]:
        roots = [(self.local_mail, localdata.LOCAL_ROOT)] if self.local_mail else []
        return roots + _archive_roots(self.archives)

    def switch(self, address: str, target: Target, username: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        if target.smtp is None:
            raise ClientError("the reconciler gave no submission server for the target system")
        try:
            old, new = profile.switch(self.path, smtp=f"{target.smtp.host}:{target.smtp.port}",
                                      mailbox=target.mailbox, system=target.system)
        except profile.ProfileError as exc:
            raise ClientError(str(exc)) from None
        def as_dict(a: profile.Account) -> dict[str, Any]:
            return {"system": a.system, "smtp": a.smtp, "mailbox": a.mailbox}
        return as_dict(old), as_dict(new)

    def rollback(self) -> bool:
        return profile.rollback(self.path)

    def remove_backup(self) -> bool:
        return profile.remove_backup(self.path)

    def remove_old_data(self, address: str) -> tuple[list[Path], str | None]:
        return [], None  # the JSON profile caches nothing of the old system

    def backup_path(self) -> Path:
        return profile.backup_path(self.path)


class Thunderbird:
    """A Thunderbird profile, found through profiles.ini unless given."""

    kind = "thunderbird"
    uses_imap = True

    def __init__(self, *, profile_dir: Path | None, profile_name: str | None,
                 profiles_ini: Path | None, archives: list[Path],
                 pop3_folders: str = "account") -> None:
        if pop3_folders not in POP3_POLICIES:
            raise ValueError(f"pop3_folders must be one of {', '.join(POP3_POLICIES)}")
        self._explicit = profile_dir
        self._name = profile_name
        self._roots = [profiles_ini] if profiles_ini else None
        self.archives = archives
        self.pop3_folders = pop3_folders

    @property
    def directory(self) -> Path:
        """The profile folder; ClientError if it cannot be found."""
        try:
            return profiles.find_profile(explicit=self._explicit, name=self._name,
                                         roots=self._roots)
        except profiles.ProfileNotFound as exc:
            raise ClientError(str(exc)) from None

    def running(self) -> str | None:
        try:
            directory = self.directory
        except ClientError:
            return None  # reported by problem()
        reason = profiles.running(directory)
        return None if reason is None else f"Thunderbird is running: {reason}"

    def problem(self, address: str) -> str | None:
        try:
            prefs = switch.load(self.directory)
            account = switch.find_account(prefs, address)
        except (ClientError, switch.SwitchError) as exc:
            return f"Thunderbird profile unusable: {exc}"
        store = prefs.get_str(f"mail.server.{account.server}.storeContractID") or \
            prefs.get_str("mail.serverDefaultStoreContractID")
        if "maildirstore" in store:
            return "Thunderbird stores mail as maildir here: only mbox storage is supported"
        return None

    def local_roots(self, address: str) -> list[tuple[Path, str]]:
        """Local Folders, the migrating POP3 account's own folders, the archives.

        A POP3 account's folders go under a folder named for the account (`pop3_folders =
        "account"`, the default: nothing mixes with what the server already has) or into
        the mailbox itself (`"merge"`: its Inbox into INBOX, Sent into Sent, ...).
        """
        directory = self.directory
        try:
            prefs = switch.load(directory)
            local = switch.local_folders_dir(prefs, directory)
            pop3 = switch.pop3_mail(prefs, directory, address) if address else None
        except switch.SwitchError as exc:
            raise ClientError(str(exc)) from None
        roots = [(local, localdata.LOCAL_ROOT)] if local is not None else []
        if pop3 is not None:
            folder, name = pop3
            account_folder = name.replace("/", "_").strip() or address
            roots.append((folder, "" if self.pop3_folders == "merge" else account_folder))
        return roots + _archive_roots(self.archives)

    def switch(self, address: str, target: Target, username: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        if target.imap is None or target.smtp is None:
            raise ClientError(f"the target system {target.system} offers no IMAP and SMTP "
                              f"servers for Thunderbird")
        try:
            return switch.switch(self.directory, address, imap=target.imap, smtp=target.smtp,
                                 username=username)
        except switch.SwitchError as exc:
            raise ClientError(str(exc)) from None

    def rollback(self) -> bool:
        return switch.rollback(self.directory)

    def remove_backup(self) -> bool:
        return switch.remove_backup(self.directory)

    def remove_old_data(self, address: str) -> tuple[list[Path], str | None]:
        try:
            return switch.remove_old_store(self.directory, address)
        except switch.SwitchError as exc:
            raise ClientError(str(exc)) from None

    def backup_path(self) -> Path:
        return switch.backup_path(self.directory)
