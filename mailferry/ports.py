"""A free TCP port on 127.0.0.1 for a server about to be started: one copy for the demo and
the tests.

Why not bind to port 0 and hand that port on: the kernel then gives out an *ephemeral* port,
from the very range every outgoing connection draws its local port from (fed's deliveries,
the mover's logins, smtplib), so between this call and the server's own bind a client socket
can take it ("address already in use", seen in CI). A port below that range is only ever
taken by a listener. The check and the bind are still two steps: a caller that starts a
server on the port should be ready to pick another and start again (tests/world.py does).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 12000  # how far below the ephemeral range the ports are drawn from
_TRIES = 100


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, chosen below the kernel's ephemeral range.

    A bounded number of random tries; a crowded range falls back to the kernel's choice."""
    top = ephemeral_start()
    rng = random.Random()
    for _ in range(_TRIES):
        port = rng.randrange(max(1024, top - _SPAN), top)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found
