"""The server's floor under a no-op pass: per mailbox, connect, log in, one `LIST ...
RETURN (STATUS ...)`, log out; nothing else. Twice: on both servers (what a pass that
reads the target cannot go below with a fresh login per mailbox and side), then on the
source only (the floor of a copy pass that finds the source unchanged since the last
verified pass and leaves the target unread, issue 22; the mover's no-op pass in a new
process does this plus reading its state store).

Run by `bench/mover_vs_mbsync.sh` with COLD_RERUN=1 (env HOST, SRC_PORT, DST_PORT,
USERS_FILE as the peer harness gives them); prints `login floor: S s (N mailboxes, P at
once, both sides)` and the same line for `source only`. Usage by hand: python
bench/imap_login_floor.py [PARALLEL]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from mailferry.mail.imap.client import ImapClient

LIST = 'LIST "" "*" RETURN (SPECIAL-USE STATUS (UIDVALIDITY UIDNEXT MESSAGES))'


async def side(host: str, port: int, user: str, password: str) -> None:
    client = await ImapClient.connect(host, port, timeout=30)
    try:
        await client.login(user, password)
        await client.simple(LIST)
    finally:
        await client.logout()


async def main(parallel: int) -> None:
    host = os.environ.get("HOST", "127.0.0.1")
    src, dst = int(os.environ["SRC_PORT"]), int(os.environ["DST_PORT"])
    text = Path(os.environ["USERS_FILE"]).read_text()
    users = [line.split()[:2] for line in text.splitlines() if line.strip()]
    gate = asyncio.Semaphore(parallel)

    for ports, what in (((src, dst), "both sides"), ((src,), "source only")):
        async def one(user: str, password: str, ports: tuple[int, ...] = ports) -> None:
            async with gate:
                await asyncio.gather(*(side(host, port, user, password) for port in ports))

        started = time.monotonic()
        await asyncio.gather(*(one(u, p) for u, p in users))
        print(f"login floor: {time.monotonic() - started:.3f} s ({len(users)} mailboxes, "
              f"{parallel} at once, {what})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
