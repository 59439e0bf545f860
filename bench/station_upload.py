#!/usr/bin/env python3
"""The station agent's upload of a Local Folders archive (E30) next to the data mover, same server.

What is measured. A Thunderbird Local Folders archive of SIZE MB (mbox files as Thunderbird
writes them: `From ` lines, X-Mozilla-Status, tags in X-Mozilla-Keys, `.sbd` subfolders) is
uploaded by the agent's own code path -- `localdata.iter_messages` into
`imapupload.upload`, with its manifest and progress lines, in a process of its own -- into a
private Dovecot (tests/dovecot.py), as the user. The peer is the data mover
(`python -m reconciler.mover copy`, one mailbox) copying the very same messages from a second
private Dovecot (Maildir written directly, indexed before the clock starts) into the same
target Dovecot, as another user. Both processes' peak RSS (ru_maxrss) is reported; the
mover's wall time is its own `first_s` (the copy with its verification), the agent's the
upload call (the agent has no verification pass: the manifest is its record).

Every message is counted on the target afterwards (`doveadm mailbox status`): a run where
either side is short is reported as such, not as a rate.

Usage (root: Dovecot's master starts as root):
    bench/station_upload.py [--size-mb 1024] [--avg-kb 40] [--keep]
Prints a table and the ratio agent/mover for messages/s and MB/s. Bounded: each side has a
timeout (--timeout, default 3600 s); every server started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dovecot import Dovecot  # noqa: E402

PASSWORD = "bench-pw"
AGENT_USER, MOVER_USER = "agent@bench.example", "mover@bench.example"
FOLDERS = [("Inbox", 40), ("Archive", 30), ("Archive.sbd/2019", 20), ("Sent", 10)]
WORDS = ["invoice", "meeting", "report", "quarterly", "budget", "project", "schedule",
         "review", "mailbox", "archive", "server", "message", "folder", "delivery", "lorem",
         "ipsum", "dolor", "sit", "amet", "consectetur"]
TAGS = ["", "", "", "$label1", "$label2 projet_x", "$label4"]


def _body(rng: random.Random, size: int) -> bytes:
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
        if line.startswith("From "):
            line = ">" + line
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


MAILDIR_NAMES = {"Inbox": ".Local Folders.Inbox", "Archive": ".Local Folders.Archive",
                 "Archive.sbd/2019": ".Local Folders.Archive.2019", "Sent": ".Local Folders.Sent"}


def make_corpus(root: Path, maildir: Path, size_mb: int, avg_kb: int, seed: int = 20
                ) -> tuple[int, int]:
    """Write the Local Folders mbox files, and the same messages as a Maildir++ under
    `maildir` (the mover's source); (messages, bytes). Nothing is kept in memory: the
    benchmark's own size must not be mistaken for the agent's (ru_maxrss is inherited
    across fork and exec on Linux)."""
    rng = random.Random(seed)
    target = size_mb * 1024 * 1024
    written = total = n = 0
    handles = {}
    for name, _ in FOLDERS:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        handles[name] = path.open("wb")
        for sub in ("cur", "new", "tmp"):
            (maildir / MAILDIR_NAMES[name] / sub).mkdir(parents=True, exist_ok=True)
    weights = [w for _, w in FOLDERS]
    try:
        while written < target:
            n += 1
            folder = rng.choices([f for f, _ in FOLDERS], weights)[0]
            when = 1262304000 + rng.randrange(15 * 365 * 86400)
            stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(when))
            seen = rng.random() < 0.8
            flagged = rng.random() < 0.1
            status = (0x1 if seen else 0) | (0x4 if flagged else 0)
            keys = rng.choice(TAGS)
            head = (f"From sender{n % 977}@example.org {stamp}\n"
                    f"X-Mozilla-Status: {status:04x}\nX-Mozilla-Status2: 00000000\n"
                    f"X-Mozilla-Keys: {keys}{' ' * 40}\n").encode()
            message = (f"From: Sender {n % 977} <sender{n % 977}@example.org>\n"
                       f"To: user@bench.example\nSubject: archived message {n}\n"
                       f"Message-ID: <bench-{n}@example.org>\n"
                       f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(when))}"
                       f"\n\n").encode() + _body(rng, int(avg_kb * 1024 * rng.uniform(0.5, 1.5)))
            handles[folder].write(head + message + b"\n")
            flags = "".join(sorted(("S" if seen else "") + ("F" if flagged else "")))
            path = (maildir / MAILDIR_NAMES[folder] / "cur" /
                    f"{when}.M{n}P1.bench,S={len(message)}:2,{flags}")
            path.write_bytes(message)
            os.utime(path, (when, when))
            written += len(head) + len(message) + 1
            total += len(message)
    finally:
        for handle in handles.values():
            handle.close()
    return n, total


def chown_tree(top: Path, uid: int, gid: int) -> None:
    for directory, _dirs, files in os.walk(top):
        os.chown(directory, uid, gid)
        for name in files:
            os.chown(os.path.join(directory, name), uid, gid)


def agent_worker(args: argparse.Namespace) -> int:
    """In its own process: the agent's upload path, timed; one JSON line on stdout."""
    from station_agent import imapupload, localdata

    account = imapupload.ImapAccount("127.0.0.1", args.port, "none", AGENT_USER, PASSWORD)
    manifest = localdata.Manifest(Path(args.state), 1)
    progress = imapupload.Progress(localdata.local_bytes(Path(args.root)))
    start = time.monotonic()
    counts = imapupload.upload(account, localdata.iter_messages(Path(args.root)), manifest,
                               progress)
    seconds = time.monotonic() - start
    print(json.dumps({"seconds": seconds, "uploaded": counts["uploaded"],
                      "bytes": counts["bytes_uploaded"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def count(dovecot: Dovecot, user: str) -> int:
    out = dovecot.doveadm("-f", "tab", "mailbox", "status", "-u", user, "messages", "*")
    return sum(int(v) for v in out.split()[1:] if v.isdigit())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--avg-kb", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--agent-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent_worker:
        return agent_worker(args)
    if os.geteuid() != 0:
        print("station_upload: needs root (private Dovecot instances)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="mfty-station-bench-"))
    work.chmod(0o755)
    servers: list[Dovecot] = []
    try:
        local = work / "profile" / "Mail" / "Local Folders"
        target = Dovecot(work, "target", {AGENT_USER: PASSWORD, MOVER_USER: PASSWORD}).start()
        servers.append(target)
        source = Dovecot(work, "source", {MOVER_USER: PASSWORD})
        source.write()
        t0 = time.monotonic()
        messages, total_bytes = make_corpus(local, source.dir / "mail" / MOVER_USER / "Maildir",
                                            args.size_mb, args.avg_kb)
        chown_tree(source.dir / "mail", source.uid, source.gid)
        mbox_bytes = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        print(f"corpus: {messages} messages, {total_bytes / 1e6:.1f} MB of messages "
              f"(mbox files {mbox_bytes / 1e6:.1f} MB), written in "
              f"{time.monotonic() - t0:.0f} s", flush=True)
        source.start()
        servers.append(source)
        assert count(source, MOVER_USER) == messages, "source Maildir not indexed"

        state = work / "agent-state"
        state.mkdir()
        agent = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--agent-worker", "--port",
             str(target.port), "--root", str(local), "--state", str(state)],
            cwd=REPO, capture_output=True, text=True, timeout=args.timeout, check=True)
        a = json.loads(agent.stdout.strip().splitlines()[-1])
        users = work / "users.txt"
        users.write_text(f"{MOVER_USER} {PASSWORD}\n")
        stats = work / "mover-stats.json"
        subprocess.run(
            [sys.executable, "-m", "reconciler.mover", "copy", "--src",
             f"127.0.0.1:{source.port}", "--dst", f"127.0.0.1:{target.port}", "--users",
             str(users), "--state", str(work / "mover.db"), "--progress", "none",
             "--parallel", "1", "--stats", str(stats)],
            cwd=REPO, capture_output=True, text=True, timeout=args.timeout, check=True)
        m = json.loads(stats.read_text())
        n_agent, n_mover = count(target, AGENT_USER), count(target, MOVER_USER)
        n = messages
        rows = [("agent (E30 upload)", a["seconds"], n_agent, a["peak_rss_mb"]),
                ("mover copy", float(m["first_s"]), n_mover, float(m["peak_rss_mb"]))]
        print(f"\n{'':20} {'seconds':>8} {'messages':>9} {'msg/s':>8} {'MB/s':>7} "
              f"{'peak RSS MB':>12}")
        for name, seconds, got, rss in rows:
            print(f"{name:20} {seconds:8.1f} {got:9d} {got / seconds:8.1f} "
                  f"{total_bytes / 1e6 / seconds:7.2f} {rss:12.1f}")
        if n_agent != n or a["uploaded"] != n or n_mover != n:
            print(f"SHORT: agent {n_agent} on the target ({a['uploaded']} uploaded), mover "
                  f"{n_mover}, {n} wanted")
            return 2
        ratio = float(m["first_s"]) / a["seconds"]
        print(f"\nagent/mover ratio (rate): {ratio:.2f}   (both to the same Dovecot, "
              f"{args.size_mb} MB, avg {args.avg_kb} KB; bench process "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
        return 0
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
