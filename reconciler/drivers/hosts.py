"""Where a real mail system's commands run and its files live: this machine, or a host over SSH.

The Postfix + Dovecot driver needs very little of the machine its servers run on: run a
command (``postconf``, ``postmap``, ``doveadm``, ``postfix reload``), read a file, replace
a file atomically (the tables Postfix and Dovecot read), remove a file or a home. `Host`
is that seam; `LocalHost` does it with subprocess and the local file system (what the
driver always did), `reconciler.drivers.sshhost.SshHost` does it on another machine over
one multiplexed OpenSSH connection. The account database and its lock never go through a
host: they stay with the reconciler.

Errors are `HostError` (a `TemporaryError`): the command that failed and what it said on
stderr, never its stdin (which may hold a table with passwords).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from mailferry.fsutil import fsync_path
from reconciler.errors import TemporaryError


class HostError(TemporaryError):
    """A command or file operation failed on a host (names the host and the command)."""


class Host(Protocol):
    """The operations a driver does on the machine its mail servers run on."""

    @property
    def label(self) -> str:
        """How errors name this host ("local", "ssh://vmadmin@mail1.example:22")."""
        ...

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            timeout: float = 60) -> str:
        """Run `argv`; its stdout, or HostError with the command and its stderr."""
        ...

    def read_file(self, path: str) -> bytes | None:
        """A file's bytes, or None if it does not exist."""
        ...

    def exists(self, path: str) -> bool:
        """Whether a file or folder exists."""
        ...

    def read_files(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        """Several files at once (one round trip on a remote host); None for an absent one."""
        ...

    def existing(self, paths: Sequence[str]) -> set[str]:
        """Which of `paths` exist (one round trip on a remote host)."""
        ...

    def snapshot(self, read: Sequence[str], exist: Sequence[str]
                 ) -> tuple[dict[str, bytes | None], set[str]]:
        """`read_files(read)` and `existing(exist)` in one round trip on a remote host."""
        ...

    def replace_file(self, path: str, data: bytes, *, mode: int = 0o644,
                     owner: tuple[int, int] | None = None,
                     postmap_config: str | None = None) -> None:
        """Replace `path` atomically: temporary file beside it, fsync, mode and owner; with
        `postmap_config`, `postmap -c <it> hash:<temporary>` and the `.db` renamed into place
        first; then the source renamed and the folder fsynced. Each renamed file gets an
        mtime in a later second than the one it replaces (`newer_than`)."""
        ...

    def remove_file(self, path: str) -> None:
        """Remove a file (absent is fine)."""
        ...

    def remove_tree(self, path: str, *, as_user: str | None = None) -> None:
        """Remove a folder and everything in it (absent is fine): a mailbox's home, owned by
        `as_user` (a host with sudo removes it as that user, not as root)."""
        ...

    def refused(self, argvs: Sequence[Sequence[str]]) -> list[str]:
        """Which of these commands the host's user may not run (sudo's rules, checked with
        ``sudo -n -l``, nothing run), each with the sudoers line that would allow it."""
        ...

    def user_ids(self, user: str) -> tuple[int, int] | None:
        """uid and gid of a user on the host, or None if there is no such user."""
        ...

    def close(self) -> None:
        """Release what the host holds (an SSH connection); using it again reopens."""
        ...


def command_text(argv: Sequence[str]) -> str:
    """A command as a person would type it (for errors)."""
    return shlex.join(list(argv))


def failure(label: str, argv: Sequence[str], stderr: str, stdout: str = "") -> HostError:
    """The error for a command that failed: host, command, the first 300 chars it said."""
    said = (stderr or stdout).strip()[:300]
    return HostError(f"{label}: {command_text(argv)} failed: {said or 'no output'}")


class LocalHost:
    """This machine: subprocess and the local file system."""

    label = "local"

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            timeout: float = 60) -> str:
        try:
            result = subprocess.run(list(argv), input=stdin, capture_output=True,
                                    timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise HostError(f"{self.label}: {command_text(argv)}: {exc}") from exc
        out = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            raise failure(self.label, argv, result.stderr.decode("utf-8", "replace"), out)
        return out

    def read_file(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HostError(f"{self.label}: read {path}: {exc}") from exc

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_files(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        return {path: self.read_file(path) for path in paths}

    def existing(self, paths: Sequence[str]) -> set[str]:
        return {path for path in paths if os.path.exists(path)}

    def snapshot(self, read: Sequence[str], exist: Sequence[str]
                 ) -> tuple[dict[str, bytes | None], set[str]]:
        return self.read_files(read), self.existing(exist)

    def replace_file(self, path: str, data: bytes, *, mode: int = 0o644,
                     owner: tuple[int, int] | None = None,
                     postmap_config: str | None = None) -> None:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.chmod(mode)
            if owner is not None:
                os.chown(tmp, *owner)
            if postmap_config is not None:
                self.run(["postmap", "-c", postmap_config, f"hash:{tmp}"])
                newer_than(Path(f"{tmp}.db"), Path(f"{target}.db"))
                os.replace(f"{tmp}.db", f"{target}.db")  # Postfix reads the .db: effective now
            newer_than(tmp, target)
            os.replace(tmp, target)
            fsync_path(target.parent)
        except OSError as exc:
            raise HostError(f"{self.label}: write {path}: {exc}") from exc

    def remove_file(self, path: str) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise HostError(f"{self.label}: remove {path}: {exc}") from exc

    def refused(self, argvs: Sequence[Sequence[str]]) -> list[str]:
        return []  # the reconciler's own user: what it may not do fails when it runs

    def remove_tree(self, path: str, *, as_user: str | None = None) -> None:
        try:
            if os.path.exists(path):
                shutil.rmtree(path)
        except OSError as exc:
            raise HostError(f"{self.label}: remove {path}: {exc}") from exc

    def user_ids(self, user: str) -> tuple[int, int] | None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        return entry.pw_uid, entry.pw_gid

    def close(self) -> None:
        pass


def newer_than(new: Path, old: Path) -> None:
    """Give `new` an mtime in a later second than `old`'s.

    Dovecot (passwd-file) and Postfix (dict_changed) notice a changed table by its mtime in
    whole seconds (Dovecot also by size): two rewrites within one second, the second of the
    same size, would otherwise go unnoticed and the servers would keep the older table."""
    try:
        before = int(old.stat().st_mtime)
    except FileNotFoundError:
        return
    stamp = max(int(new.stat().st_mtime), before + 1)
    os.utime(new, (stamp, stamp))
