"""What a long-running mailferry process owes its host: private files and a ready signal.

`private_files()` sets the process's umask to 077, so that everything it and its children
create (the state store, fed's spool and databases, the embedded system's Maildirs and
logs, token files) is 0600 or 0700 whatever umask the shell or service manager handed
down: mail and tokens are for their owner only.

`notify_ready()` is systemd's sd_notify(3) for `Type=notify` units: one datagram
`READY=1` to the socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace). Without that variable (not under systemd) it does nothing; a failure to send
is reported by the return value, never raised: a service must not die because its
supervisor went away.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Every file this process creates from now on is readable by its owner only."""
    os.umask(PRIVATE_UMASK)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1") to systemd; False when not sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def notify_ready(status: str = "") -> bool:
    """Tell systemd the service is ready (after its sockets listen)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def exposure(path: str | Path) -> str | None:
    """Why a secret file is readable by others (as ssh says of a key), or None when only its
    owner (and root) can read it."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
                f"chmod 600 {path}")
    return None
