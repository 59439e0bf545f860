"""The mail client profile the agent switches from the old system to the new one (E30-E33).

Why a simple JSON profile. The patent changes "the parameterization or profile of the
station" to one compatible with the new system, tests it, restores the old one on failure and
deletes the old one on success. Thunderbird is the real first target, but its prefs.js
rewriting deserves a module of its own; this minimal agent handles a profile file of the form
`{"account": {"address": ..., "smtp": "host:port", "mailbox": ..., "system": ...}}` and keeps
every other key it finds untouched. The mail client's lock files (`lock`, `.parentlock`, the
Thunderbird convention) are looked for in the profile's directory.

Why the backup rules are strict. The backup `PROFILE.json.bak` is the user's only way back:
- it is written (atomically) only if absent, so a second attempt after a crash never
  overwrites the original with an already-switched profile;
- the switched profile is always derived from the backup, so switching twice gives the same
  result;
- a rollback copies the backup's bytes back exactly (byte-for-byte, formatting included)
  before removing it; the backup is removed only after a successful test (E33).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from station_agent.fsutil import atomic_write, fsync_dir

LOCK_FILES = ("lock", ".parentlock")
ACCOUNT_FIELDS = ("address", "smtp", "mailbox", "system")


class ProfileError(Exception):
    """The profile cannot be read, parsed or written."""


@dataclass(frozen=True)
class Account:
    """The account of a profile."""

    address: str
    smtp: str
    mailbox: str
    system: str


def backup_path(profile: Path) -> Path:
    """Where the old parameterization is kept until E33."""
    return profile.with_name(profile.name + ".bak")


def parse_profile(data: bytes, source: Path) -> tuple[dict[str, Any], Account]:
    """The whole document and its account, or ProfileError naming what is wrong."""
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{source}: not valid JSON: {exc}") from None
    account = document.get("account") if isinstance(document, dict) else None
    if not isinstance(account, dict):
        raise ProfileError(f"{source}: no \"account\" object")
    missing = [key for key in ACCOUNT_FIELDS if not isinstance(account.get(key), str)
               or not account.get(key)]
    if missing:
        raise ProfileError(f"{source}: account lacks {', '.join(missing)}")
    return document, Account(**{key: str(account[key]) for key in ACCOUNT_FIELDS})


def load_account(profile: Path) -> Account:
    """The profile's current account."""
    try:
        data = profile.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{profile}: cannot read: {exc.strerror or exc}") from None
    return parse_profile(data, profile)[1]


def client_lock(profile: Path) -> Path | None:
    """The lock file showing the mail client is running, or None."""
    for name in LOCK_FILES:
        candidate = profile.parent / name
        # Thunderbird's `lock` on Linux is a symlink to a non-existent target: lexists.
        if os.path.lexists(candidate):
            return candidate
    return None


def switch(profile: Path, *, smtp: str, mailbox: str, system: str) -> tuple[Account, Account]:
    """Back the profile up (once) and point it to the target; return (old, new) accounts."""
    backup = backup_path(profile)
    if backup.exists():
        original = backup.read_bytes()  # an earlier attempt's backup is the true original
    else:
        try:
            original = profile.read_bytes()
        except OSError as exc:
            raise ProfileError(f"{profile}: cannot read: {exc.strerror or exc}") from None
        parse_profile(original, profile)  # never back up (and replace) a broken profile
        atomic_write(backup, original)
    document, old = parse_profile(original, backup)
    document["account"].update({"smtp": smtp, "mailbox": mailbox, "system": system})
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    atomic_write(profile, text.encode("utf-8"))
    new = Account(address=old.address, smtp=smtp, mailbox=mailbox, system=system)
    return old, new


def rollback(profile: Path) -> bool:
    """Restore the backup byte-for-byte and drop it; False if there was no backup."""
    backup = backup_path(profile)
    if not backup.exists():
        return False
    atomic_write(profile, backup.read_bytes())
    # Removing the backup only after the restore is on disk: a crash in between leaves two
    # identical files, which the next attempt handles like a fresh start.
    remove_backup(profile)
    return True


def remove_backup(profile: Path) -> bool:
    """Delete the old parameterization (E33); False if it was already gone."""
    backup = backup_path(profile)
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()
        fsync_dir(backup.parent)
        return True
    return False
