"""Finding the user's Thunderbird profile, and telling honestly whether Thunderbird runs.

Why discovery. A help desk installs one agent configuration for a whole fleet; it cannot
name each user's profile folder (`xyz123ab.default-release`). Thunderbird records its
profiles in `profiles.ini` under its data folder -- `~/.thunderbird` on Linux (also the Snap
and Flatpak ones), `~/Library/Thunderbird` on macOS, `%APPDATA%\\Thunderbird` on Windows --
each as a `[ProfileN]` section (`Name`, `Path`, `IsRelative`, `Default`), and since
Thunderbird 68 the profile an installation really starts with as `Default=` of an
`[Install...]` section. The agent takes, in this order: a profile folder given in its
configuration, a profile named in its configuration, the `[Install...]` default, the
profile marked `Default=1`, the only profile.

Why the lock test is more than "a lock file exists". Thunderbird leaves `.parentlock` behind
after a clean exit on Linux and macOS, and a crash leaves the `lock` symlink too; a check that
only looked for files would tell the user "close Thunderbird" forever. So:
- `lock` (a symlink to `IP:+PID`, Linux/macOS): running if that process is alive; a dead PID
  is a stale lock. A lock naming another machine's address (a profile on a network share) is
  counted as running: we cannot look at that machine's processes.
- `.parentlock` / `parent.lock`: Thunderbird holds an fcntl lock on it (POSIX) or opens it
  without sharing (Windows); running if we cannot take that lock ourselves, and we release it
  at once.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class ProfileNotFound(Exception):
    """No Thunderbird profile could be found or chosen."""


@dataclass(frozen=True)
class ProfileEntry:
    """One profile of a profiles.ini."""

    name: str
    path: Path
    default: bool


def default_roots() -> list[Path]:
    """Where Thunderbird keeps profiles.ini on this platform, most likely first."""
    home = Path.home()
    if sys.platform == "win32":
        appdata = os.environ.get("APPDATA") or str(home / "AppData" / "Roaming")
        return [Path(appdata) / "Thunderbird"]
    if sys.platform == "darwin":
        return [home / "Library" / "Thunderbird"]
    return [home / ".thunderbird", home / "snap" / "thunderbird" / "common" / ".thunderbird",
            home / ".var" / "app" / "org.mozilla.Thunderbird" / ".thunderbird"]


def read_profiles_ini(ini: Path) -> tuple[list[ProfileEntry], Path | None]:
    """The profiles of `ini`, and the [Install...] default (None if there is none)."""
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        with ini.open(encoding="utf-8-sig") as handle:
            parser.read_file(handle)
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        raise ProfileNotFound(f"{ini}: unreadable: {exc}") from None
    base = ini.parent

    def resolve(raw: str, relative: bool) -> Path:
        # profiles.ini always uses '/', also on Windows.
        return (base / raw) if relative else Path(raw)

    entries: list[ProfileEntry] = []
    for section in parser.sections():
        if not section.startswith("Profile") or not parser.has_option(section, "Path"):
            continue
        relative = parser.get(section, "IsRelative", fallback="1").strip() == "1"
        entries.append(ProfileEntry(
            name=parser.get(section, "Name", fallback=section),
            path=resolve(parser.get(section, "Path"), relative),
            default=parser.get(section, "Default", fallback="0").strip() == "1"))
    install_default = None
    for section in parser.sections():
        if section.startswith("Install") and parser.has_option(section, "Default"):
            raw = parser.get(section, "Default")
            install_default = resolve(raw, not os.path.isabs(raw))
            break
    return entries, install_default


def find_profile(*, explicit: Path | None = None, name: str | None = None,
                 roots: list[Path] | None = None) -> Path:
    """The profile folder to migrate (see the module docstring for the order)."""
    if explicit is not None:
        if not (explicit / "prefs.js").is_file():
            raise ProfileNotFound(f"{explicit}: no prefs.js: not a Thunderbird profile")
        return explicit
    searched: list[str] = []
    for root in roots if roots is not None else default_roots():
        ini = root / "profiles.ini" if root.is_dir() else root
        searched.append(str(ini))
        if not ini.is_file():
            continue
        entries, install_default = read_profiles_ini(ini)
        if name is not None:
            chosen = [e.path for e in entries if e.name == name]
            if not chosen:
                raise ProfileNotFound(f"{ini}: no profile named {name!r} (have "
                                      f"{', '.join(e.name for e in entries) or 'none'})")
            return chosen[0]
        if install_default is not None:
            return install_default
        defaults = [e.path for e in entries if e.default]
        if defaults:
            return defaults[0]
        if len(entries) == 1:
            return entries[0].path
        raise ProfileNotFound(f"{ini}: {len(entries)} profiles and none is the default: "
                              f"name one in the agent configuration")
    raise ProfileNotFound("no Thunderbird profiles.ini found (looked at "
                          f"{', '.join(searched)})")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell (e.g. Windows): assume the worst
    return True


def _local_addresses() -> set[str]:
    found = {"127.0.0.1", "::1", "0.0.0.0"}
    with contextlib.suppress(OSError):
        host = socket.gethostname()
        found.add(socket.gethostbyname(host))
        for info in socket.getaddrinfo(host, None):
            found.add(str(info[4][0]))
    return found


def _symlink_lock(path: Path) -> str | None:
    """The reason the `lock` symlink shows a running Thunderbird, or None (absent/stale)."""
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError:
        # A plain file named lock (some filesystems): cannot be read as IP:+PID.
        return f"lock file {path} present" if path.exists() else None
    address, _, pid_text = target.rpartition(":")
    pid_text = pid_text.lstrip("+")
    if not pid_text.isdigit():
        return f"lock {path} -> {target!r} (unreadable owner)"
    if address and address not in _local_addresses():
        return f"lock {path} held from another machine ({address})"
    if _pid_alive(int(pid_text)):
        return f"Thunderbird runs as process {pid_text} (lock {path})"
    return None  # stale: the process is gone


def _file_lock(path: Path) -> str | None:
    """The reason `.parentlock`/`parent.lock` is held by a live process, or None."""
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:
        # Windows: Thunderbird opens parent.lock without sharing.
        return f"{path} is held open by Thunderbird"
    except OSError:
        return None
    try:
        if fcntl is None:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return f"{path} is locked by a running Thunderbird"
            return None
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running(profile_dir: Path) -> str | None:
    """Why Thunderbird is running on this profile, or None if it is not."""
    return (_symlink_lock(profile_dir / "lock") or _file_lock(profile_dir / ".parentlock")
            or _file_lock(profile_dir / "parent.lock"))
