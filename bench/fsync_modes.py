#!/usr/bin/env python3
"""How long making one new 2 KB queue file and its folder durable takes, by who fsyncs.

    bench/fsync_modes.py [ROUNDS] [--dir DIR]

Each round creates one file (``O_EXCL``, one write) per mode and makes it and its folder
durable, the modes interleaved so that the disk's load hits them alike; prints the median,
90th percentile and mean per mode. Modes: ``same`` (file, then folder, in this thread),
``file-only`` (the file alone, as the harness's fsync probe and Postfix's cleanup),
``pool`` (file and folder concurrently from two pool threads: fed's spool before issue 22),
``here+pool`` (the file in this thread while a pool thread syncs the folder: fed's spool
since, ``Spool._write_batch``), ``made-ahead`` (the file was created and its folder synced
before the clock starts, as ``Spool.take_queue_id`` does: write and the file's fsync only).
Bounded: ROUNDS (default 200) rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

DATA = b"x" * 2300


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rounds", nargs="?", type=int, default=200)
    ap.add_argument("--dir", default=None, help="folder on the disk to measure")
    args = ap.parse_args()
    pool = ThreadPoolExecutor(4)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        counter = [0]

        def new_file() -> tuple[int, str]:
            counter[0] += 1
            path = os.path.join(folder, f"{counter[0]}.eml")
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path

        def same(fd: int, dir_fd: int) -> None:
            os.fsync(fd)
            os.fsync(dir_fd)

        def file_only(fd: int, dir_fd: int) -> None:
            os.fsync(fd)

        def pooled(fd: int, dir_fd: int) -> None:
            list(pool.map(os.fsync, [fd, dir_fd]))

        def here_and_pool(fd: int, dir_fd: int) -> None:
            folder_synced = pool.submit(os.fsync, dir_fd)
            os.fsync(fd)
            folder_synced.result()

        modes: dict[str, Callable[[int, int], None]] = {
            "same": same, "file-only": file_only, "pool": pooled, "here+pool": here_and_pool}
        times: dict[str, list[float]] = {name: [] for name in [*modes, "made-ahead"]}
        for _ in range(args.rounds):
            for name, sync in modes.items():
                started = time.perf_counter()
                fd, path = new_file()
                os.write(fd, DATA)
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                sync(fd, dir_fd)
                os.close(dir_fd)
                os.close(fd)
                times[name].append(time.perf_counter() - started)
                os.unlink(path)
            fd, path = new_file()  # made ahead: name synced before the clock starts
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dir_fd)
            os.close(dir_fd)
            started = time.perf_counter()
            os.write(fd, DATA)
            os.fsync(fd)
            os.close(fd)
            times["made-ahead"].append(time.perf_counter() - started)
            os.unlink(path)
        for name, got in times.items():
            got.sort()
            print(f"{name:10s} median {1000 * got[len(got) // 2]:.2f} ms, "
                  f"p90 {1000 * got[len(got) * 9 // 10]:.2f} ms, "
                  f"mean {1000 * statistics.mean(got):.2f} ms")
    pool.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
