#!/usr/bin/env -S sh -c 'exec "$(dirname "$0")/../.venv/bin/python" "$0" "$@"'
"""The mover between Cyrus and Dovecot, next to Dovecot -> Dovecot and to mbsync, in one run;
and what the read-back proof (issue 21) costs, against the mover before it, same run.

Servers (private, 127.0.0.1, started and stopped by PID through the tests' harnesses):
Dovecot A (source), Dovecot B (target), Cyrus C (`munge8bit: no`, source and target). Data:
USERS x MSGS messages per source (4 folders, ~AVG bytes each, flags, old dates), appended
over IMAP into A and C. Every run copies into fresh, empty target users:

  mover      D->D, C->D, D->C   this tree (read-back proof)
  mover-old  D->D, C->D, D->C   the mover before the proof (OLD_TREE, default: `git archive
                                main` of this repository), same data, same servers
  mbsync-4   D->D, C->D, D->C   isync/mbsync, 4 users at a time, as ../shared/bench runs it

Each run is a fresh process, timed wall to wall (Python start included for the movers), then
counted: every target user must hold exactly the source's messages (by Message-ID, per
folder). Per-user logins everywhere (the same for all three; the mover before this work
pipelined NAMESPACE and LIST behind AUTHENTICATE, which Cyrus loses: one timeout per mailbox).

Usage (root): bench/mover_cyrus.py [USERS] [MSGS]        default 8 300
Knobs: AVG (message size, 4096), PARALLEL (mover --parallel, 8), TIMEOUT (the movers' IMAP
timeout, 10 s as in issue 21), OLD_TREE, NO_OLD=1, NO_MBSYNC=1,
RUNS (repetitions of the whole set, alternating old and new, default 1).
"""

from __future__ import annotations

import imaplib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import cyrus  # noqa: E402  (the tests' harnesses)
import dovecot  # noqa: E402

PY = os.environ.get("MOVER_PYTHON", str(REPO / ".venv/bin/python"))
FOLDERS = (("INBOX", 50), ("Sent", 20), ("Archive", 20), ("Archive/2023", 10))
WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "mailbox", "relay", "queue", "message",
         "folder", "server", "migrate", "delivery", "header", "body", "archive", "invoice",
         "meeting", "report", "budget", "project"]
RUN_TIMEOUT = 900


def corpus(user: str, count: int, avg: int, seed: int) -> list[tuple[str, bytes, str, str]]:
    """(folder, message, flags, internaldate) of one user, deterministic."""
    rng = random.Random(seed)
    weights = [w for _, w in FOLDERS]
    result = []
    for n in range(count):
        folder = rng.choices([f for f, _ in FOLDERS], weights)[0]
        size = rng.randint(avg // 2, avg * 3 // 2)
        lines, body = [], 0
        while body < size:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
            lines.append(line)
            body += len(line) + 2
        when = 1_000_000_000 + rng.randint(0, 700_000_000)
        data = (f"From: sender{n % 17}@example.org\r\nTo: {user}@example.org\r\n"
                f"Subject: message {n} of {user}\r\nMessage-ID: <{user}.{n}@bench>\r\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(when))}"
                f"\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode()
        flags = rng.choices(["(\\Seen)", "", "(\\Seen \\Flagged)", "(\\Answered \\Seen)"],
                            [70, 15, 10, 5])[0]
        result.append((folder, data, flags, imaplib.Time2Internaldate(when)))
    return result


def native(folder: str, sep: str, prefix: str) -> str:
    return "INBOX" if folder == "INBOX" else prefix + folder.replace("/", sep)


def populate(conn: imaplib.IMAP4, messages: list[tuple[str, bytes, str, str]], sep: str,
             prefix: str) -> int:
    for folder, _ in FOLDERS:
        if folder != "INBOX":
            for part in (folder.split("/")[0], folder):
                conn.create(f'"{native(part, sep, prefix)}"')
    total = 0
    for folder, data, flags, date in messages:
        typ, _ = conn.append(f'"{native(folder, sep, prefix)}"', flags or None, date, data)
        assert typ == "OK", typ
        total += len(data)
    return total


def counted(port: int, user: str, sep: str, prefix: str) -> Counter[tuple[str, str]]:
    """(folder, Message-ID) of every message of a user (as the user)."""
    conn = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    conn.login(user, "pw")
    found: Counter[tuple[str, str]] = Counter()
    try:
        for folder, _ in FOLDERS:
            typ, _ = conn.select(f'"{native(folder, sep, prefix)}"', readonly=True)
            if typ != "OK":
                continue
            typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            for item in data:
                if isinstance(item, tuple):
                    mid = re.search(rb"<[^>]+>", item[1])
                    found[(folder, mid.group(0).decode() if mid else "")] += 1
    finally:
        conn.logout()
    return found


def mover(tree: Path | None, src: int, dst: int, pairs: list[tuple[str, str]], work: Path,
          name: str, parallel: int) -> tuple[float, str, float | None]:
    users = work / f"{name}.users"
    users.write_text("".join(f"{s} pw {d} pw\n" for s, d in pairs))
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    cmd = [PY, "-m", "reconciler.mover", "copy", "--src", f"127.0.0.1:{src}",
           "--dst", f"127.0.0.1:{dst}", "--users", str(users), "--state",
           str(work / f"{name}.db"), "--progress", "none", "--parallel", str(parallel),
           "--report", "json", "--timeout", os.environ.get("TIMEOUT", "10"),
           "--stats", str(work / f"{name}.stats")]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    wall = time.monotonic() - started
    status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stdout[-300:]}"
    try:  # the copy's own time, without Python's start and the state store's creation
        copy = float(json.loads((work / f"{name}.stats").read_text())["first_s"])
    except (OSError, ValueError, KeyError):
        copy = None
    return wall, status, copy


def mbsync(src: tuple[int, str, str], dst: tuple[int, str, str], pairs: list[tuple[str, str]],
           work: Path, name: str) -> tuple[float, str]:
    """mbsync as ../shared/bench/imap_copy.sh configures it (Pull, Create Near, arrival
    dates), one channel per user, 4 at a time."""
    state = work / f"{name}.state"
    state.mkdir()
    rc = work / f"{name}.mbsyncrc"
    text = (f"Sync Pull\nCreate Near\nRemove None\nExpunge None\nCopyArrivalDate yes\n"
            f"SyncState {state}/\n\n")
    for s, d in pairs:
        for side, (port, sep, _prefix), user in (("far", src, s), ("near", dst, d)):
            text += (f"IMAPAccount {side}-{user}\nHost 127.0.0.1\nPort {port}\nUser {user}\n"
                     f"Pass pw\nSSLType None\n\nIMAPStore {side}-{user}\nAccount {side}-{user}\n"
                     + (f"PathDelimiter {sep}\n" if sep != "/" else "") + "\n")
        text += f"Channel {s}\nFar :far-{s}:\nNear :near-{d}:\nPatterns *\n\n"
    rc.write_text(text)
    rc.chmod(0o600)
    started = time.monotonic()
    done = subprocess.run(["xargs", "-P", "4", "-n", "1", "mbsync", "-c", str(rc), "-q"],
                          input="\n".join(s for s, _ in pairs), text=True,
                          capture_output=True, timeout=RUN_TIMEOUT)
    wall = time.monotonic() - started
    return wall, "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-300:]}"


def main() -> int:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    msgs = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    avg = int(os.environ.get("AVG", "4096"))
    parallel = int(os.environ.get("PARALLEL", "8"))
    runs = int(os.environ.get("RUNS", "1"))
    for why in (dovecot.available(), cyrus.available()):
        if why:
            print(f"mover_cyrus: {why}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="mfty-bench-cyrus-"))
    work.chmod(0o755)
    old_tree: Path | None = None
    if not os.environ.get("NO_OLD"):
        old_tree = Path(os.environ.get("OLD_TREE", str(work / "old")))
        if not os.environ.get("OLD_TREE"):
            old_tree.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "main", "reconciler"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
    have_mbsync = shutil.which("mbsync") is not None and not os.environ.get("NO_MBSYNC")
    methods = ["mover"] + (["mover-old"] if old_tree else []) + (["mbsync-4"] if have_mbsync
                                                                 else [])
    directions = ("D->D", "C->D", "D->C")
    names = [f"s{u}" for u in range(users)]

    def target(method: str, r: int, d: str, i: int) -> str:
        return f"t{methods.index(method)}r{r}{d[0]}{d[-1]}u{i}".lower()
    targets = [target(m, r, d, u)
               for m in methods for r in range(runs) for d in directions for u in range(users)]
    everyone = {n: "pw" for n in names + targets}
    dv_root, cy_root = dovecot.private_root(), cyrus.private_root()
    a = dovecot.Dovecot(dv_root, "a", everyone)
    b = dovecot.Dovecot(dv_root, "b", everyone)
    c = cyrus.Cyrus(cy_root, "c", everyone, munge8bit=False)
    results: list[tuple[str, str, int, float, str]] = []  # method, direction, run, s, status
    try:
        a.start()
        b.start()
        c.start()
        total_bytes = total_msgs = 0
        for i, user in enumerate(names):
            data = corpus(user, msgs, avg, seed=i)
            for port, sep, prefix in ((a.port, "/", ""), (c.port, ".", "INBOX.")):
                conn = imaplib.IMAP4("127.0.0.1", port, timeout=60)
                conn.login(user, "pw")
                size = populate(conn, data, sep, prefix)
                conn.logout()
            total_bytes += size
            total_msgs += len(data)
        ends = {"D": (a.port, "/", ""), "C": (c.port, ".", "INBOX.")}
        dst_of = {"D->D": (b.port, "/", ""), "C->D": (b.port, "/", ""),
                  "D->C": (c.port, ".", "INBOX.")}
        expected = {k: {u: counted(ends[k][0], u, ends[k][1], ends[k][2]) for u in names}
                    for k in ends}
        print(f"data: {users} users x {msgs} messages = {total_msgs} messages, "
              f"{total_bytes / 1e6:.1f} MB per source; load {os.getloadavg()[0]:.2f}")
        for r in range(runs):
            order = methods if r % 2 == 0 else list(reversed(methods))
            for method in order:
                for d in directions:
                    pairs = [(u, target(method, r, d, i)) for i, u in enumerate(names)]
                    src, dst = ends[d[0]], dst_of[d]
                    copy: float | None = None
                    if method == "mbsync-4":
                        wall, status = mbsync(src, dst, pairs, work, f"{method}{r}{d[0]}{d[-1]}")
                    else:
                        tree = old_tree if method == "mover-old" else None
                        wall, status, copy = mover(tree, src[0], dst[0], pairs, work,
                                                   f"{method}{r}{d[0]}{d[-1]}", parallel)
                    if status == "ok":
                        for s, t in pairs:
                            if counted(dst[0], t, dst[1], dst[2]) != expected[d[0]][s]:
                                status = f"BADCOPY {t}"
                                break
                    results.append((method, d, r, wall, status))
                    if copy is not None:
                        results.append((method + " copy", d, r, copy, status))
                    inner = f"  (copy {copy:.2f} s, {total_bytes / 1e6 / copy:.2f} MB/s)" \
                        if copy else ""
                    print(f"{method:10} {d:5} run {r}: {wall:7.2f} s  "
                          f"{total_bytes / 1e6 / wall:7.2f} MB/s  {total_msgs / wall:8.0f} msgs/s"
                          f"{inner}  {status}", flush=True)
    finally:
        c.stop()
        b.stop()
        a.stop()
        if not os.environ.get("KEEP_TMP"):
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(dv_root, ignore_errors=True)
            shutil.rmtree(cy_root, ignore_errors=True)

    def best(method: str, d: str) -> float | None:
        walls = [w for m, dd, _, w, s in results if m == method and dd == d and s == "ok"]
        return min(walls) if walls else None

    print("\n== best time per method and direction (s; 'copy': the mover's own copy time from "
          "--stats, without Python's start), ratios in the same run")
    columns = [m for m in methods if m == "mbsync-4"] + [
        c for m in methods if m != "mbsync-4" for c in (m, m + " copy")]
    print(f"{'direction':10} " + " ".join(f"{m:>15}" for m in columns)
          + "  new/old copy (read-back)  mover/mbsync-4 wall")
    summary: dict[str, dict[str, float | None]] = {}
    for d in directions:
        row = {m: best(m, d) for m in columns}
        summary[d] = row
        new, old = row.get("mover copy"), row.get("mover-old copy")
        cost = f"{new / old:.2f}" if new and old else "-"
        mover_wall, peer = row.get("mover"), row.get("mbsync-4")
        ratio = f"{mover_wall / peer:.2f}" if mover_wall and peer else "-"
        print(f"{d:10} " + " ".join(f"{row[m]:15.2f}" if row[m] else f"{'failed':>15}"
                                    for m in columns) + f"  {cost:>24}  {ratio:>19}")
    print("json: " + json.dumps({"users": users, "msgs": msgs, "bytes": total_bytes,
                                 "best_wall_s": summary}))
    return 0 if all(s == "ok" for *_, s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
