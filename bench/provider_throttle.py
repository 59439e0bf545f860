#!/usr/bin/env -S sh -c 'exec "$(dirname "$0")/../.venv/bin/python" "$0" "$@"'
"""The mover into a system that throttles, with and without the adaptive back-off, in one
run (issue 17, "Provider behaviour").

Servers (private, 127.0.0.1, started and stopped by PID through the tests' harnesses): a
Dovecot source, a Dovecot target, and in front of the target the tests' throttling proxy
(`tests/helpers/imap_proxy.py`) playing a provider's per-user rate limit: an APPEND while
more than RATE messages were appended in the last second is answered `NO [THROTTLED]`
(Exchange Online's text), and a login while more than CONNS connections are open
`NO [LIMIT] Too many simultaneous connections`.

Each variant copies USERS x MSGS messages into fresh target users, PARALLEL mailboxes at once,
through a fresh proxy:

  adaptive   the mover's `LocalPace`: halves connections and rate on a refusal, gives
             connections back, pauses (growing), recovers slowly
  fixed      the same mover with a pace that only pauses (the same growing pause) and never
             slows down: what a copy that "just retries" does
  mbsync-4   the peer (isync/mbsync, configured as ../shared/bench/imap_copy.sh does), 4
             users at a time, through the same kind of proxy

and is then counted on the target by Message-ID (lost, duplicated). Printed per variant:
wall, messages/s, refusals the proxy gave, peak connections after the first refusal.
RUNS=2 alternates the order. Last lines: the best complete walls, `adaptive/fixed` and
`adaptive/mbsync-4 wall ratio: X.XX` (a variant that left messages behind has no wall).

Usage (root): bench/provider_throttle.py [USERS] [MSGS]     default 8 400
Knobs: RATE (300 messages/s), CONNS (4), PARALLEL (8), RUNS (1), BATCH (10 messages per APPEND),
PENALTY (COUNT:SECONDS, default none: after COUNT refusals within 10 s the proxy refuses
everything for SECONDS, as providers lock out a client that keeps hammering).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from mailferry.mail.imap.client import ImapClient  # noqa: E402
from reconciler.drivers.base import ImapAccount  # noqa: E402
from reconciler.mover.endpoints import ImapEndpoint  # noqa: E402
from reconciler.mover.pace import Backoff, LocalPace  # noqa: E402
from reconciler.mover.pipeline import Options  # noqa: E402
from reconciler.mover.runner import Job, run_jobs_async  # noqa: E402

import dovecot  # noqa: E402  (the tests' harnesses)
from helpers import mail  # noqa: E402
from helpers.imap_proxy import ThrottlingProxy  # noqa: E402

BACKOFF = Backoff(base=0.5, cap=4.0, settle=0.5, recover_every=5.0, window=2.0, min_rate=5.0)


class FixedPace(LocalPace):
    """Pauses after a refusal like `LocalPace`, but never lowers connections or rate."""

    def throttled(self, reason: str) -> float:
        self.refusals += 1
        self.strikes += 1
        return min(self.backoff.cap, self.backoff.base * 2.0 ** min(self.strikes - 1, 30))


async def message_ids(port: int, user: str) -> Counter[str]:
    client = await ImapClient.connect("127.0.0.1", port, timeout=30)
    await client.login(user, f"pw-{user}")
    found: Counter[str] = Counter()

    def collect(resp: list[object]) -> None:
        items = resp[2] if len(resp) > 2 and isinstance(resp[2], list) else []
        for i in range(0, len(items) - 1, 2):
            if isinstance(items[i], bytes) and items[i].upper().startswith(b"BODY[HEADER"):
                found[mail.message_id(items[i + 1])] += 1

    exists = [r for r in await client.simple("EXAMINE INBOX")
              if len(r) > 1 and r[1] == b"EXISTS" and r[0] != b"0"]
    if exists:  # FETCH 1:* is an error in an empty folder
        await client.simple("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
                            handler=collect)  # type: ignore[arg-type]
    await client.logout()
    return found


async def variant(name: str, src: int, dst: int, users: list[str], msgs: int,
                  parallel: int, rate: float, conns: int, batch: int,
                  penalty: tuple[int, float] | None) -> dict[str, float]:
    proxy = ThrottlingProxy(dst, max_rate=rate, limit=conns, penalty=penalty)
    pace = (LocalPace if name == "adaptive" else FixedPace)("target", backoff=BACKOFF)

    def job(user: str) -> Job:
        s = ImapAccount("127.0.0.1", src, user.split("-")[0], f"pw-{user.split('-')[0]}",
                        timeout=30)
        d = ImapAccount("127.0.0.1", proxy.port, user, f"pw-{user}", timeout=30)
        return Job(user, lambda: ImapEndpoint(s, readonly=True),
                   lambda: ImapEndpoint(d, pace=pace), options=Options(batch_messages=batch))

    started = time.monotonic()
    try:
        reports = await run_jobs_async([job(u) for u in users], parallel=parallel)
    finally:
        wall = time.monotonic() - started
        proxy.close()
    refused = proxy.first("refuse") or proxy.first("limit")
    lost = dup = 0
    for user in users:
        got = await message_ids(dst, user)
        lost += msgs - len(got)
        dup += sum(n - 1 for n in got.values())
    verified = sum(r.verified for r in reports)
    for r in reports:
        if not r.verified:
            print(f"  {r.key}: not verified after {r.attempts} attempts ({r.throttled} "
                  f"throttled): {(r.error or '')[:160]}")
    refusals = sum(1 for _, k, _ in proxy.events if k in ("refuse", "limit"))
    penalties = sum(1 for _, k, _ in proxy.events if k == "penalty")
    peak = proxy.peak_connections(refused + 1.0) if refused else proxy.peak_connections()
    copied = len(users) * msgs - lost
    print(f"{name:9} wall {wall:6.2f} s  {copied / wall:7.1f} msg/s copied  verified "
          f"{verified}/{len(users)}  lost {lost}  duplicated {dup}  refusals {refusals}  "
          f"lock-outs {penalties}  peak connections after the first refusal {peak}",
          flush=True)
    return {"wall": wall, "refusals": refusals, "lost": lost, "dup": dup,
            "complete": float(verified == len(users))}


def mbsync(src: int, dst: int, users: list[str], msgs: int, rate: float, conns: int,
           penalty: tuple[int, float] | None, tmp: Path) -> dict[str, float]:
    """The peer: one `mbsync` channel per user, 4 at once (the harness's mbsync-par)."""
    proxy = ThrottlingProxy(dst, max_rate=rate, limit=conns, penalty=penalty)
    state = tmp / f"mbsync-state-{users[0]}"
    state.mkdir(parents=True)
    rc = tmp / f"mbsyncrc-{users[0]}"
    text = (f"Sync Pull\nCreate Near\nRemove None\nExpunge None\nCopyArrivalDate yes\n"
            f"SyncState {state}/\n\n")
    for user in users:
        base = user.split("-")[0]
        text += (f"IMAPAccount src-{user}\nHost 127.0.0.1\nPort {src}\nUser {base}\n"
                 f"Pass pw-{base}\nSSLType None\n\nIMAPStore src-{user}\nAccount src-{user}\n\n"
                 f"IMAPAccount dst-{user}\nHost 127.0.0.1\nPort {proxy.port}\nUser {user}\n"
                 f"Pass pw-{user}\nSSLType None\n\nIMAPStore dst-{user}\nAccount dst-{user}\n\n"
                 f"Channel {user}\nFar :src-{user}:\nNear :dst-{user}:\nPatterns *\n\n")
    rc.write_text(text)
    started = time.monotonic()

    def one(user: str) -> int:
        return subprocess.run(["mbsync", "-c", str(rc), "-q", user], capture_output=True,
                              timeout=600).returncode

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(one, users))
    finally:
        wall = time.monotonic() - started
        proxy.close()
    lost = dup = 0
    for user in users:
        got = asyncio.run(message_ids(dst, user))
        lost += msgs - len(got)
        dup += sum(n - 1 for n in got.values())
    refusals = sum(1 for _, k, _ in proxy.events if k in ("refuse", "limit"))
    penalties = sum(1 for _, k, _ in proxy.events if k == "penalty")
    copied = len(users) * msgs - lost
    print(f"{'mbsync-4':9} wall {wall:6.2f} s  {copied / wall:7.1f} msg/s copied  exit 0: "
          f"{codes.count(0)}/{len(users)}  lost {lost}  duplicated {dup}  refusals "
          f"{refusals}  lock-outs {penalties}  peak connections {proxy.peak_connections()}",
          flush=True)
    return {"wall": wall, "lost": lost}


def main() -> int:
    users_n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    msgs = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    rate, conns = float(os.environ.get("RATE", 300)), int(os.environ.get("CONNS", 4))
    parallel, runs = int(os.environ.get("PARALLEL", 8)), int(os.environ.get("RUNS", 1))
    batch = int(os.environ.get("BATCH", 10))
    count, _, seconds = os.environ.get("PENALTY", "").partition(":")
    penalty = (int(count), float(seconds)) if count else None
    if dovecot.available():
        print(f"skipped: {dovecot.available()}")
        return 2
    root = dovecot.private_root()
    base = [f"u{i}" for i in range(users_n)]
    targets = [f"{u}-{v}-{r}" for r in range(runs) for v in ("a", "f", "m") for u in base]
    src = dovecot.Dovecot(root, "src", {u: f"pw-{u}" for u in base}).start()
    dst = dovecot.Dovecot(root, "dst", {u: f"pw-{u}" for u in targets}).start()
    try:
        for u in base:
            body = "x" * 1500
            asyncio.run(mail.imap_fill(src.port, u, f"pw-{u}", {"INBOX": [
                (mail.message(f"{u} {i}", f"<{u}.{i}@bench.example>", body), "")
                for i in range(msgs)]}))
        print(f"{users_n} users x {msgs} messages (~1.7 KB), {parallel} at once; proxy: "
              f"{rate:g} messages/s, {conns} connections, penalty {penalty}", flush=True)
        walls: dict[str, list[float]] = {"adaptive": [], "fixed": [], "mbsync-4": []}
        for r in range(runs):
            order = ("adaptive", "fixed") if r % 2 == 0 else ("fixed", "adaptive")
            for name in order:
                users = [f"{u}-{name[0]}-{r}" for u in base]
                got = asyncio.run(variant(name, src.port, dst.port, users, msgs, parallel,
                                          rate, conns, batch, penalty))
                if got["complete"]:
                    walls[name].append(got["wall"])
            if shutil.which("mbsync"):
                got = mbsync(src.port, dst.port, [f"{u}-m-{r}" for u in base], msgs, rate,
                             conns, penalty, root)
                if not got["lost"]:
                    walls["mbsync-4"].append(got["wall"])
        best = {k: min(v) for k, v in walls.items() if v}
        print("best complete wall: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items())
              + "".join(f", {k} never complete" for k in walls if k not in best))
        for peer in ("fixed", "mbsync-4"):
            if "adaptive" in best and peer in best:
                print(f"adaptive/{peer} wall ratio: {best['adaptive'] / best[peer]:.2f}")
    finally:
        src.stop()
        dst.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
