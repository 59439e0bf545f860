"""A wave copied by 1, 2 and 4 `reconcile worker` processes, in one run (issue 18).

    python3 bench/wave_workers.py [--mailboxes 48] [--messages 15] [--rate 5] [--concurrency 2]

Two private Dovecots (tests/dovecot.py) and a private PostgreSQL (tests/pgutil.py) on
127.0.0.1. The source is reached through a relay that lets each connection read at most
`rate x size` bytes/s (about `rate` messages/s of the wave's `size`-byte messages): the
provider's per-connection throttle, so that the bottleneck is the source, not these two
cores. For each worker count the wave is a fresh set of mailboxes (the same sizes), queued
at once through the reconciler's queue (`reconciler.workers.queue.Queue.offload`, the E15
data part) and copied by the workers (each `--concurrency` jobs at a time: one source
connection each); its rate is the messages copied over the time from the first enqueue to
the last result. The peer, in the same run: the same copy in-process as `reconcile --apply`
does it without workers (one mailbox after another), over a smaller set at the same
per-connection rate.

Then the time from enqueue to a worker starting a job: single jobs queued one at a time
on idle workers (LISTEN/NOTIFY wakes them), the started_at - enqueued_at of the store.

The issue's wave (2,000 mailboxes, or 200 of 10 MB) does not fit this machine's two shared
cores in a bench run: the default is 32 mailboxes x 30 messages per worker count; the figure
that matters, the scaling at a source-bound rate, does not depend on the wave's length.
The reconciler's own passes (E1-E9, the transitions) are not in this figure: the mailboxes
are recorded at state 7 directly and only their E15 data part is queued.

Last line: `wave workers: 1 -> X msg/s, 2 -> Y msg/s, 4 -> Z msg/s, scaling 4/1 = R`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import imaplib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from reconciler.drivers.base import mailbox_id_for  # noqa: E402
from reconciler.drivers.registry import make_drivers  # noqa: E402
from reconciler.errors import NotReady  # noqa: E402
from reconciler.mover.service import move_mail  # noqa: E402
from reconciler.spec.loader import load_specs  # noqa: E402
from reconciler.spec.modes import Modes  # noqa: E402
from reconciler.state.model import DataJob, Migration, utcnow  # noqa: E402
from reconciler.state.store import Store, open_store  # noqa: E402
from reconciler.workers.queue import Queue  # noqa: E402

import dovecot  # noqa: E402  (the tests' harnesses)
import pgutil  # noqa: E402
from helpers.processes import stop_process  # noqa: E402
from sysutil import free_port  # noqa: E402

SIZE = 1024  # bytes per message, about
MASTER = ("mfadmin", "mf-master-pw")


class Relay:
    """127.0.0.1:port -> the source, each connection's server-to-client bytes at most
    `bps` per second (a token bucket per connection: the provider's throttle)."""

    def __init__(self, target: int, bps: float) -> None:
        self.target, self.bps, self.port = target, bps, free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       rate: float | None) -> None:
            tokens, stamp = 0.0, time.monotonic()
            try:
                while data := await src.read(4096):
                    if rate:
                        now = time.monotonic()
                        tokens = min(rate, tokens + (now - stamp) * rate)
                        stamp = now
                        tokens -= len(data)
                        if tokens < 0:
                            await asyncio.sleep(-tokens / rate)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, None), pipe(up_r, writer, self.bps))

    def close(self) -> None:
        """Nothing to do: the relay's thread is a daemon, its connections end with the
        servers (stopping its loop under live connections only makes noise)."""


def message(user: str, n: int) -> bytes:
    head = (f"From: bench@corp.example\r\nTo: {user}\r\nMessage-ID: <b{n}.{user}>\r\n"
            f"Subject: wave {n}\r\n\r\n").encode()
    return head + b"x" * max(0, SIZE - len(head) - 2) + b"\r\n"


def seed(port: int, users: list[str], messages: int) -> None:
    for user in users:
        conn = imaplib.IMAP4("127.0.0.1", port)
        conn.login(user, "pw")
        for n in range(messages):
            conn.append("INBOX", None, None, message(user, n))
        conn.logout()


def specs_for(root: Path, src_port: int, dst_port: int) -> Path:
    secret = root / "master.password"
    secret.write_text(MASTER[1] + "\n")
    secret.chmod(0o600)

    def system(name: str, port: int) -> dict[str, Any]:
        return {"apiVersion": "mailferry/v1", "kind": "MailSystem", "metadata": {"name": name},
                "spec": {"driver": "imap", "domains": ["corp.example"], "imap": {
                    "server": f"127.0.0.1:{port}", "tls": "none", "login": "master",
                    "masterUser": {"user": MASTER[0], "password": {"file": str(secret)}},
                    "stateDir": str(root / name)}}}
    docs = [system("src", src_port), system("dst", dst_port),
            {"apiVersion": "mailferry/v1", "kind": "FedHub", "metadata": {"name": "fed"},
             "spec": {"smtp": f"127.0.0.1:{free_port()}",
                      "control": f"http://127.0.0.1:{free_port()}",
                      "token": {"file": str(root / "fed.token")},
                      "stateDir": str(root / "fed"), "domains": ["corp.example"]}}]
    folder = root / "specs"
    folder.mkdir()
    (folder / "systems.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def record(store: Store, users: list[str], modes: Modes) -> list[Migration]:
    """Migrations at state 7 (the mover took them), as the engine leaves them after E11."""
    with store.session() as session:
        rows = [Migration(address=u, aliases=[], source_system="src", target_system="dst",
                          source_mailbox=mailbox_id_for(u), target_mailbox=mailbox_id_for(u),
                          placement="bench", modes=modes, state=7, address_migration_id="b")
                for u in users]
        session.add_all(rows)
    return rows


def enqueue(queue: Queue, rows: list[Migration]) -> None:
    for m in rows:  # a new row: offload queues it (NotReady), no step session needed
        with contextlib.suppress(NotReady):
            queue.take(None, m, "E15")  # type: ignore[arg-type]


def results(store: Store, ids: list[int]) -> list[DataJob]:
    with store.session() as session:
        return list(session.query(DataJob).filter(DataJob.migration_id.in_(ids)).all())


def wave(store: Store, queue: Queue, rows: list[Migration], timeout: float) -> float:
    """Queue every row's E15, wait for all results: messages copied per second."""
    ids = [m.id for m in rows]
    began = utcnow()
    enqueue(queue, rows)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = results(store, ids)
        if len(found) == len(ids) and all(j.status in ("done", "error") for j in found):
            break
        time.sleep(0.25)
    else:
        raise SystemExit(f"wave not done in {timeout:.0f} s")
    errors = [j.result for j in found if j.status == "error"]
    if errors:
        raise SystemExit(f"{len(errors)} jobs failed: {errors[:2]}")
    copied = sum(int((j.result or {})["detail"]["copied"]) for j in found)
    last = max(j.finished_at for j in found if j.finished_at is not None)
    return copied / (last - began).total_seconds()


def start_workers(specs: Path, url: str, n: int, concurrency: int,
                  logs: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        with open(logs / f"worker{n}-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state", url,
                 "worker", "--concurrency", str(concurrency)], cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT))
    return procs


def wait_workers(store: Store, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with store.engine.connect() as conn:
            try:
                alive = conn.exec_driver_sql(
                    "SELECT count(*) FROM procrastinate_workers "
                    "WHERE last_heartbeat > now() - interval '15 s'").scalar()
            except Exception:
                alive = 0
        if int(alive or 0) >= n:
            return
        time.sleep(0.2)
    raise SystemExit("workers did not start")


def latency(store: Store, queue: Queue, rows: list[Migration]) -> list[float]:
    """Enqueue-to-start of single jobs on idle workers, one after the other (seconds)."""
    seen = []
    for m in rows:
        enqueue(queue, [m])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (job,) = results(store, [m.id]) or (None,)
            if job is not None and job.status in ("done", "error"):
                break
            time.sleep(0.05)
        assert job is not None and job.started_at is not None
        seen.append((job.started_at - job.enqueued_at).total_seconds())
        time.sleep(0.3)  # idle again
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=32)
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--rate", type=float, default=5.0,
                        help="messages/s one source connection may read")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--baseline", type=int, default=6,
                        help="mailboxes of the in-process peer")
    args = parser.parse_args()
    counts = (1, 2, 4)
    sets = {n: [f"w{n}u{i}@corp.example" for i in range(args.mailboxes)] for n in counts}
    base_users = [f"base{i}@corp.example" for i in range(args.baseline)]
    lat_users = [f"lat{i}@corp.example" for i in range(10)]
    users = [u for s in sets.values() for u in s] + base_users
    root = Path(tempfile.mkdtemp(prefix="mf-wave-workers-"))
    root.chmod(0o755)
    droot = dovecot.private_root()
    logins = {u: "pw" for u in users + lat_users}
    src = dovecot.Dovecot(droot, "src", logins, master=MASTER).start()
    dst = dovecot.Dovecot(droot, "dst", logins, master=MASTER).start()
    pg = pgutil.PrivatePostgres().start()
    relay = Relay(src.port, args.rate * SIZE * 1.15)  # FETCH framing: ~15 % over the body
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        seed(src.port, users, args.messages)
        seed(src.port, lat_users, 1)
        print(f"seeded {len(users)} mailboxes x {args.messages} messages "
              f"in {time.monotonic() - started:.1f} s", flush=True)
        specs_dir = specs_for(root, relay.port, dst.port)
        store = open_store(pg.url)
        queue = Queue(store)
        modes = replace(Modes(), diary=False, max_parallel=64)

        # The peer: in-process, one mailbox after another (reconcile --apply today).
        specs = load_specs(specs_dir)
        drivers = make_drivers(specs)
        began, copied = time.monotonic(), 0
        for u in base_users:
            report = move_mail(drivers["src"], mailbox_id_for(u), drivers["dst"],
                               mailbox_id_for(u), key=u, modes=modes, phase="copy",
                               manifest=None)
            assert report.verified, report.error
            copied += report.copied
        peer = copied / (time.monotonic() - began)
        print(f"in-process (no workers, one copy at a time): {peer:.1f} msg/s "
              f"({copied} messages)", flush=True)

        rates: dict[int, float] = {}
        for n in counts:
            procs = start_workers(specs_dir, pg.url, n, args.concurrency, root)
            wait_workers(store, n)
            rows = record(store, sets[n], modes)
            rates[n] = wave(store, queue, rows, timeout=600)
            print(f"{n} worker(s) x {args.concurrency}: {rates[n]:.1f} msg/s "
                  f"({len(rows)} mailboxes x {args.messages})", flush=True)
            if n == counts[-1]:
                lat_rows = record(store, lat_users, modes)
                seen = latency(store, queue, lat_rows)
                print(f"enqueue to start on idle workers: median "
                      f"{statistics.median(seen) * 1000:.0f} ms, max {max(seen) * 1000:.0f} ms "
                      f"({len(seen)} jobs)", flush=True)
            for proc in procs:
                stop_process(proc, 30)
            procs = []
        ratio = rates[4] / rates[1]
        print(f"4 workers / in-process peer: x{rates[4] / peer:.1f}")
        print(f"wave workers: 1 -> {rates[1]:.1f} msg/s, 2 -> {rates[2]:.1f} msg/s, "
              f"4 -> {rates[4]:.1f} msg/s, scaling 4/1 = {ratio:.2f}")
        queue.close()
    finally:
        for proc in procs:
            stop_process(proc, 30)
        relay.close()
        src.stop()
        dst.stop()
        pg.stop()
        if not os.environ.get("KEEP_TMP"):
            import shutil

            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(droot, ignore_errors=True)


if __name__ == "__main__":
    main()
