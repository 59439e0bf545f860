"""The issue's waves copied by 1, 2 and 4 `reconcile worker` processes, in one run (issue 18).

    python3 bench/wave_workers.py [--wave small|big|both] [--mailboxes N] [--messages M]
        [--size BYTES | --mailbox-bytes BYTES] [--rate MSG/S] [--concurrency C]

The waves (`--wave both`, the default, runs the big one, then the small one):

- small: 2,000 mailboxes of `--messages` (default 2) messages of 1 KB, the source 1
  message (1 KB)/s per connection;
- big: 200 mailboxes of 10 MB each (`--mailbox-bytes`, in messages of `--size`, 1 MB), the
  source 1 message (1 MB)/s per connection.

Each worker runs `--concurrency` (8) jobs at a time. The rates are chosen so that 4 x 8
connections at full speed use about half of these two cores (a small job costs about 70 ms
of CPU over the worker, PostgreSQL, the Dovecots and the relay; the bench prints each
part's CPU): at 4 and 2 msg/s per connection (before 2026-12-06) 4 workers were CPU-bound
here and the figure measured the machine, not the fleet.

Two private Dovecots (tests/dovecot.py) and a private PostgreSQL (tests/pgutil.py) on
127.0.0.1. The source is reached through a relay that lets each connection read at most
`rate x size` bytes/s: the provider's per-connection throttle, so that the bottleneck is
the source, not these two cores. The source is seeded once per wave; each worker count
copies it into its own target mailboxes (`w1.`, `w2.`, `w4.` + the source's user), as
fresh migrations. A wave is queued at once through the reconciler's queue
(`reconciler.workers.queue.Queue.take`, the E15 data part) and collected through the same
call: after each `Queue.wait` (woken by the workers' NOTIFY), `take` of every migration
whose row is finished (it returns the worker's detail, the row deleted in the caller's
session; a pass of the engine would plan and ask every outstanding migration: not measured
here, see README "Known limits"). Its rate: the messages copied over the time from the
first enqueue to the last result collected. Every target mailbox is then read back (one
`doveadm -A fetch`) and compared with its source by Message-ID: each message exactly once,
nothing missing, nothing extra.

The peer, in the same run: the same copy in-process as `reconcile --apply` does it without
workers (one mailbox after another), over `--baseline` mailboxes at the same
per-connection rate. Then the time from enqueue to a worker starting a job: `--latency`
single jobs queued one at a time on idle workers (LISTEN/NOTIFY wakes them), the
started_at - enqueued_at of their rows (median and p95), and in the wave itself the time
from the first enqueue to the first job started.

The reconciler's own passes (planning E1-E9, the transitions) are not in this figure: the
mailboxes are recorded at state 7 directly and only their E15 data part is queued.

Last line (of the small wave): `wave workers: 1 -> X msg/s, 2 -> Y msg/s, 4 -> Z msg/s,
scaling 4/1 = R`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from mailferry.mail.imap.client import ImapClient  # noqa: E402
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

MASTER = ("mfadmin", "mf-master-pw")
KB, MB = 1024, 1024 * 1024
COUNTS = (1, 2, 4)


@dataclass(frozen=True)
class WaveSpec:
    name: str
    mailboxes: int
    messages: int
    size: int  # bytes per message, about
    rate: float  # messages/s one source connection may read
    baseline: int  # mailboxes of the in-process peer

    @property
    def label(self) -> str:
        each = f"{self.size // MB} MB" if self.size >= MB else f"{self.size // KB} KB"
        return f"{self.mailboxes} mailboxes x {self.messages} messages of {each}"


PRESETS = {
    "small": WaveSpec("small", 2000, 2, 1 * KB, 1.0, 10),
    "big": WaveSpec("big", 200, 10, 1 * MB, 1.0, 2),
}

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of process `root` and its descendants (live ones, and those reaped by
    a live one: the kernel's cutime/cstime); of this process alone for our own pid (its
    children are the workers and PostgreSQL, counted apart)."""
    if root == os.getpid():
        return sum(os.times()[:2])
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = sum(int(f) for f in fields[11:15]) / TICK
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack += [c for c, parent in parents.items() if parent == pid]
    return total


class CpuMeter:
    """CPU seconds of the bench's own processes over a wave, by part."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self.parts = parts
        self.before = {k: sum(tree_cpu(p) for p in pids) for k, pids in parts.items()}
        self.began = time.monotonic()

    def report(self) -> str:
        wall = time.monotonic() - self.began
        used = {k: sum(tree_cpu(p) for p in pids) - self.before[k]
                for k, pids in self.parts.items()}
        return "CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in used.items()) + \
            f" (wall {wall:.1f} s)"


def spy(pids: list[int], folder: Path | None, tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on each worker and on this process (`--profile DIR`), raw stacks into DIR."""
    tool = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if folder is None or tool is None:
        return []
    return [subprocess.Popen([tool, "record", "--pid", str(pid), "--rate", "40",
                              "--format", "raw", "--threads", "--nonblocking", "--output",
                              str(folder / f"{tag}-{i}.txt")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for i, pid in enumerate(pids)]


class Relay:
    """127.0.0.1:port -> the source, each connection's server-to-client bytes at most
    `bps` per second (a token bucket per connection: the provider's throttle)."""

    def __init__(self, target: int, bps: float) -> None:
        self.target, self.bps, self.port = target, bps, free_port()
        self.connections = self.sent = 0  # counted on the relay's loop only
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
        self.connections += 1

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       rate: float | None) -> None:
            tokens, stamp = 0.0, time.monotonic()
            try:
                while data := await src.read(65536):
                    if rate:
                        now = time.monotonic()
                        tokens = min(rate, tokens + (now - stamp) * rate)
                        stamp = now
                        tokens -= len(data)
                        if tokens < 0:
                            await asyncio.sleep(-tokens / rate)
                        self.sent += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, None), pipe(up_r, writer, self.bps))


def message(user: str, n: int, size: int) -> bytes:
    head = (f"From: bench@corp.example\r\nTo: {user}\r\nMessage-ID: <b{n}.{user}>\r\n"
            f"Subject: wave {n}\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (max(0, size - len(head)) // len(line))
    return head + body + b"end\r\n"


def seed(port: int, users: list[str], messages: int, size: int) -> None:
    """Each user's INBOX: `messages` messages in one MULTIAPPEND (four users at a time)."""
    async def one(user: str) -> None:
        client = await ImapClient.connect("127.0.0.1", port, timeout=60)
        await client.login(user, "pw")
        segments = [b"APPEND INBOX"]
        for n in range(messages):
            segments[-1] += b" () "
            segments += [message(user, n, size), b""]
        await client.finish(await client.start(segments, "APPEND"))
        await client.logout()

    with ThreadPoolExecutor(4) as pool:
        for _ in pool.map(lambda u: asyncio.run(one(u)), users):
            pass


def message_ids(server: dovecot.Dovecot) -> dict[str, Counter[str]]:
    """user -> Message-ID -> copies, of every user of `server` (one doveadm -A)."""
    out = server.doveadm("-f", "tab", "fetch", "-A", "hdr.message-id", "mailbox", "*")
    found: dict[str, Counter[str]] = {}
    for line in out.splitlines()[1:]:
        user, _, mid = line.partition("\t")
        found.setdefault(user, Counter())[mid.strip()] += 1
    return found


def check_copies(dst: dovecot.Dovecot, pairs: dict[str, str], messages: int) -> str:
    """Every target mailbox holds each of its source's Message-IDs exactly once, nothing
    else: what was found, or SystemExit naming the first mailbox that does not."""
    found = message_ids(dst)
    total = 0
    for target, source in pairs.items():
        want = Counter({f"<b{n}.{source}>": 1 for n in range(messages)})
        got = found.get(target, Counter())
        if got != want:
            lost = sorted((want - got).keys())[:3]
            extra = sorted((got - want).elements())[:3]
            raise SystemExit(f"{target}: {sum(got.values())} messages, expected {messages} "
                             f"(missing {lost}, duplicated or foreign {extra})")
        total += sum(got.values())
    return (f"{len(pairs)} mailboxes x {messages}: {total} messages, each once by "
            f"Message-ID, none missing, none duplicated")


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


def record(store: Store, pairs: dict[str, str], modes: Modes) -> list[Migration]:
    """Migrations (target user -> source user) at state 7, as the engine leaves them after
    E11: the mover took them."""
    with store.session() as session:
        rows = [Migration(address=t, aliases=[], source_system="src", target_system="dst",
                          source_mailbox=mailbox_id_for(s), target_mailbox=mailbox_id_for(t),
                          placement="bench", modes=modes, state=7, address_migration_id="b")
                for t, s in pairs.items()]
        session.add_all(rows)
        session.flush()
        session.expunge_all()
    return rows


def enqueue(queue: Queue, store: Store, rows: list[Migration]) -> None:
    """The reconciler's first pass over the wave: each E15 queued (NotReady), then the
    pass's new jobs deferred, as the pass's end (`Queue.wait`) does: `take` holds them to
    defer them together."""
    for m in rows:
        with contextlib.suppress(NotReady), store.session() as session:
            queue.take(session, m, "E15")
    queue.flush()


@dataclass
class WaveResult:
    rate: float
    copied: int
    seconds: float
    enqueue_seconds: float
    first_start: float
    passes: int
    job_seconds: float  # a job's copy, its mean (copy_started to copy_finished)


def wave(store: Store, queue: Queue, rows: list[Migration], timeout: float) -> WaveResult:
    """Queue every row's E15, then collect as the reconciler's passes do: messages/s."""
    began = utcnow()
    t0 = time.monotonic()
    enqueue(queue, store, rows)
    enqueue_seconds = time.monotonic() - t0
    pending = {m.id: m for m in rows}
    copied, passes, last = 0, 0, began
    spans: list[float] = []
    starts: list[datetime] = []
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise SystemExit(f"wave not done in {timeout:.0f} s ({len(pending)} left)")
        queue.wait(lambda: False, timeout=5.0)
        with store.session() as session:  # what is finished (take deletes the rows)
            earliest = session.scalar(select(func.min(DataJob.started_at)).where(
                DataJob.status.in_(("done", "error")), DataJob.started_at >= began))
            if earliest is not None:
                starts.append(earliest)
            ready = set(session.scalars(select(DataJob.migration_id).where(
                DataJob.status.in_(("done", "error")))))
        passes += 1
        for mid in ready & pending.keys():
            m = pending[mid]
            try:
                with store.session() as session:
                    detail = queue.take(session, m, "E15")
            except NotReady:
                continue
            copied += int(detail["copied"])
            finished = datetime.fromisoformat(str(detail["copy_finished"]))
            last = max(last, finished)
            spans.append((finished - datetime.fromisoformat(str(detail["copy_started"])))
                         .total_seconds())
            del pending[mid]
    seconds = (last - began).total_seconds()
    first = (min(starts) - began).total_seconds() if starts else float("nan")
    return WaveResult(copied / seconds, copied, seconds, enqueue_seconds, first, passes,
                      statistics.mean(spans))


def start_workers(specs: Path, url: str, n: int, concurrency: int, logs: Path,
                  tag: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        with open(logs / f"worker-{tag}-{n}-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state", url,
                 "worker", "--concurrency", str(concurrency)], cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT))
    return procs


def wait_workers(store: Store, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a worker exited at start (see its log)")
        with store.engine.connect() as conn:
            try:
                alive = conn.exec_driver_sql(
                    "SELECT count(*) FROM procrastinate_workers "
                    "WHERE last_heartbeat > now() - interval '15 s'").scalar()
            except Exception:
                alive = 0
        if int(alive or 0) >= len(procs):
            return
        time.sleep(0.2)
    raise SystemExit("workers did not start")


def latency(store: Store, queue: Queue, rows: list[Migration]) -> list[float]:
    """Enqueue-to-start of single jobs on idle workers, one after the other (seconds)."""
    seen = []
    for m in rows:
        enqueue(queue, store, [m])
        deadline = time.monotonic() + 60
        job: DataJob | None = None
        while time.monotonic() < deadline:
            with store.session() as session:
                job = session.query(DataJob).filter(DataJob.migration_id == m.id).first()
                if job is not None and job.status in ("done", "error") and \
                        job.started_at is not None:
                    seen.append((job.started_at - job.enqueued_at).total_seconds())
                    with contextlib.suppress(NotReady):  # collected: the row goes
                        queue.take(session, m, "E15")
                    break
            time.sleep(0.05)
        else:
            raise SystemExit(f"latency job {m.address} not done in 60 s")
        time.sleep(0.3)  # idle again
    return seen


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def pg_pid(pg: pgutil.PrivatePostgres) -> int:
    return pg.process.pid if pg.process is not None else 0


def run_wave(spec: WaveSpec, args: argparse.Namespace, root: Path, droot: Path,
             pg: pgutil.PrivatePostgres, store: Store, queue: Queue) -> dict[int, float]:
    """One wave: its Dovecots, the peer, 1, 2 and 4 workers, the check of every copy."""
    sources = [f"{spec.name}{i}@corp.example" for i in range(spec.mailboxes)]
    targets = {n: {f"w{n}.{s}": s for s in sources} for n in COUNTS}
    peer_pairs = {f"base.{s}": s for s in sources[:spec.baseline]}
    lat_sources = [f"lat{spec.name}{i}@corp.example" for i in range(args.latency)]
    lat_pairs = {f"w.{s}": s for s in lat_sources}
    src_users = {u: "pw" for u in sources + lat_sources}
    dst_users = {u: "pw" for t in (*targets.values(), peer_pairs, lat_pairs) for u in t}
    src = dovecot.Dovecot(droot, f"src-{spec.name}", src_users, master=MASTER,
                          performance=args.dovecot_performance).start()
    dst = dovecot.Dovecot(droot, f"dst-{spec.name}", dst_users, master=MASTER,
                          performance=args.dovecot_performance).start()
    relay = Relay(src.port, spec.rate * spec.size * 1.05)  # FETCH framing: ~5 % over
    procs: list[subprocess.Popen[bytes]] = []
    rates: dict[int, float] = {}
    try:
        started = time.monotonic()
        seed(src.port, sources, spec.messages, spec.size)
        seed(src.port, lat_sources, 1, min(spec.size, KB))
        print(f"[{spec.name}] seeded {spec.label} in {time.monotonic() - started:.1f} s; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        wave_root = root / spec.name
        wave_root.mkdir()
        specs_dir = specs_for(wave_root, relay.port, dst.port)
        modes = replace(Modes(), diary=False, max_parallel=64)

        # The peer: in-process, one mailbox after another (reconcile --apply today).
        drivers = make_drivers(load_specs(specs_dir))
        began, copied = time.monotonic(), 0
        for t, s in peer_pairs.items():
            report = move_mail(drivers["src"], mailbox_id_for(s), drivers["dst"],
                               mailbox_id_for(t), key=t, modes=modes, phase="copy",
                               manifest=None)
            assert report.verified, report.error
            copied += report.copied
        peer = copied / (time.monotonic() - began)
        print(f"[{spec.name}] in-process (no workers, one copy at a time): {peer:.2f} msg/s "
              f"({copied} messages); {check_copies(dst, peer_pairs, spec.messages)}",
              flush=True)

        for n in COUNTS:
            procs = start_workers(specs_dir, pg.url, n, args.concurrency, root, spec.name)
            wait_workers(store, procs)
            rows = record(store, targets[n], modes)
            load = os.getloadavg()[0]
            spies = spy([os.getpid(), *(p.pid for p in procs)], args.profile,
                        f"{spec.name}-{n}")
            meter = CpuMeter({"workers": [p.pid for p in procs], "bench": [os.getpid()],
                              "postgres": [pg_pid(pg)],
                              "dovecots": [d for d in (src.pid(), dst.pid()) if d]})
            conns, sent = relay.connections, relay.sent
            got = wave(store, queue, rows, timeout=args.timeout)
            cpu = meter.report()
            conns, sent = relay.connections - conns, relay.sent - sent
            for proc in spies:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
                proc.wait(30)
            rates[n] = got.rate
            print(f"[{spec.name}] {n} worker(s) x {args.concurrency}: {got.rate:.2f} msg/s "
                  f"({got.copied} messages in {got.seconds:.1f} s; enqueue of {len(rows)} "
                  f"jobs {got.enqueue_seconds:.2f} s, first job started "
                  f"{got.first_start * 1000:.0f} ms after the first enqueue, {got.passes} "
                  f"collecting passes; a job's copy {got.job_seconds:.2f} s on average; "
                  f"load average {load:.1f} -> {os.getloadavg()[0]:.1f})",
                  flush=True)
            print(f"[{spec.name}] {cpu}; the source sent {sent / KB:.0f} KB over {conns} "
                  f"connections ({sent / max(1, conns) / KB:.1f} KB each)", flush=True)
            print(f"[{spec.name}] check: {check_copies(dst, targets[n], spec.messages)}",
                  flush=True)
            if n == COUNTS[-1] and lat_pairs:
                seen = latency(store, queue, record(store, lat_pairs, modes))
                print(f"[{spec.name}] enqueue to start on idle workers: median "
                      f"{statistics.median(seen) * 1000:.0f} ms, p95 {p95(seen) * 1000:.0f} ms, "
                      f"max {max(seen) * 1000:.0f} ms ({len(seen)} jobs)", flush=True)
            for proc in procs:
                stop_process(proc, 60)
            procs = []
        print(f"[{spec.name}] 4 workers / in-process peer: x{rates[4] / peer:.1f}", flush=True)
        return rates
    finally:
        for proc in procs:
            stop_process(proc, 60)
        src.stop()
        dst.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wave", choices=("small", "big", "both"), default="both")
    parser.add_argument("--mailboxes", type=int, help="mailboxes per wave (2000 / 200)")
    parser.add_argument("--messages", type=int, help="messages per mailbox (2 / 10)")
    parser.add_argument("--size", type=int, help="bytes per message (1 KB / 1 MB)")
    parser.add_argument("--mailbox-bytes", type=int,
                        help="bytes per mailbox: messages = mailbox-bytes / size")
    parser.add_argument("--rate", type=float,
                        help="messages/s one source connection may read (1 / 1)")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs per worker")
    parser.add_argument("--baseline", type=int, help="mailboxes of the in-process peer")
    parser.add_argument("--latency", type=int, default=30,
                        help="single jobs for the enqueue-to-start time")
    parser.add_argument("--dovecot-performance", action=argparse.BooleanOptionalAction,
                        default=True, help="both Dovecots in high-performance login mode "
                        "with imap process reuse, as a provider runs them (default on)")
    parser.add_argument("--profile", type=Path,
                        help="py-spy each worker into this folder (raw stacks)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per wave, at most")
    args = parser.parse_args()
    names = ["big", "small"] if args.wave == "both" else [args.wave]
    specs = []
    for name in names:
        spec = PRESETS[name]
        size = args.size or spec.size
        messages = args.messages or (args.mailbox_bytes // size if args.mailbox_bytes
                                     else spec.messages)
        specs.append(replace(spec, mailboxes=args.mailboxes or spec.mailboxes,
                             messages=max(1, messages), size=size,
                             rate=args.rate or spec.rate,
                             baseline=args.baseline or spec.baseline))
    root = Path(tempfile.mkdtemp(prefix="mf-wave-workers-"))
    root.chmod(0o755)
    droot = dovecot.private_root()
    # 4 workers x C jobs: a guard connection per job, the pools of each process
    pg = pgutil.PrivatePostgres({"max_connections": "400"}).start()
    store = open_store(pg.url)
    queue = Queue(store)
    results: dict[str, dict[int, float]] = {}
    began = time.monotonic()
    try:
        for spec in specs:
            print(f"[{spec.name}] {spec.label}, source {spec.rate:g} msg/s per connection, "
                  f"{args.concurrency} jobs per worker; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            results[spec.name] = run_wave(spec, args, root, droot, pg, store, queue)
        print(f"whole run {time.monotonic() - began:.0f} s", flush=True)
        for spec in specs:
            r = results[spec.name]
            print(f"[{spec.name}: {spec.label}]")
            print(f"wave workers: 1 -> {r[1]:.1f} msg/s, 2 -> {r[2]:.1f} msg/s, "
                  f"4 -> {r[4]:.1f} msg/s, scaling 4/1 = {r[4] / r[1]:.2f}")
    finally:
        queue.close()
        pg.stop()
        if not os.environ.get("KEEP_TMP"):
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(droot, ignore_errors=True)


if __name__ == "__main__":
    main()
