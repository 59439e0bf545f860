#!/usr/bin/env python3
"""fed's commit path alone: how long the spool takes to make a message durable.

    bench/spool_commit.py [--messages 2000] [--clients "1 10 50"] [--dir DIR]

Runs fed's real ``Spool`` (group commit, queue files, fsync of file and folder, the SQLite
index) on fed's event loop (uvloop when installed), with C coroutines each accepting one
2 KB message after the other, and prints per concurrency the messages per second and the
mean time from submit to "durable" (what a client waits before its 250), next to the
fsync probe of ../shared/bench/fsync_probe.py measured in the same folder. No SMTP, no
delivery: the difference between this and the probe is fed's own commit machinery (thread
hand-offs, the folder's fsync, the index). Bounded: --messages per concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from fed.app import _loop_factory  # noqa: E402
from fed.queue.spool import Spool  # noqa: E402
from fed.queue.store import Store  # noqa: E402
from fed.smtp.server import INLINE_SESSIONS  # noqa: E402

BODY = b"Subject: bench\r\nMessage-ID: <x@bench>\r\n\r\n" + b"x" * 76 * 27 + b"\r\n"


def fsync_probe(folder: Path, count: int = 200) -> float:
    """Mean ms of create + write 4 KB + fsync of a new file (the peer harness's probe)."""
    total = 0.0
    for n in range(count):
        path = folder / f"probe.{n}"
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
        os.close(fd)
        total += time.perf_counter() - started
        path.unlink()
    return 1000 * total / count


async def run(folder: Path, clients: int, messages: int) -> tuple[float, float, str]:
    store = Store(folder / "fed.db")
    spool = Spool(folder / "spool", store)
    spool.start()
    latencies: list[float] = []
    per_client = messages // clients

    async def client() -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            await spool.accept(spool.take_queue_id(), "a@example.test", ["b@example.test"], BODY,
                               "<x@bench>", quiet=clients <= INLINE_SESSIONS)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    stats = spool.stats()
    await spool.close()
    store.close()
    return len(latencies) / elapsed, 1000 * sum(latencies) / len(latencies), stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", default="1 10 50")
    ap.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"fsync probe: {fsync_probe(Path(tmp)):.2f} ms per new file")
        for n, clients in enumerate(int(c) for c in args.clients.split()):
            folder = Path(tmp) / f"run{n}"
            folder.mkdir()
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                rate, latency, stats = runner.run(run(folder, clients, args.messages))
            print(f"clients {clients:3d}: {rate:6.0f} msg/s, {latency:.2f} ms submit->durable;"
                  f" {stats}")
        print(f"fsync probe: {fsync_probe(Path(tmp)):.2f} ms per new file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
