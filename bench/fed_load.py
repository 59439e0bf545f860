#!/usr/bin/env python3
"""fed under two loads Postfix's harness does not cover: big messages and mass holds.

    bench/fed_load.py memory [--clients 50] [--size-mb 10] [--processes 1]
        50 clients each send one 10 MB message at the same time; prints fed's peak RSS
        (VmHWM) once every message has reached the sink. Target: < 1 GB. With
        --processes N, the sum of the peaks of the parent and its N nodes (an upper bound).
    bench/fed_load.py holds [--addresses 1000] [--senders 4] [--flip batch|one]
        1,000 addresses (one mailbox each) on system s1 get mail from 4 senders without a
        pause; meanwhile one batch POST /v1/holds, one POST /v1/flips with a flip per
        mailbox (--flip one: a POST /v1/flip per mailbox, 8 in parallel), one batch POST
        /v1/release move all of them to s2. Prints the time of hold, flips and release, and
        checks that every acknowledged message arrived and that s1 got nothing for an
        address after its hold answered. Target: < 2 s, nothing lost.

Everything runs on 127.0.0.1: fed as a subprocess (``python -m fed serve``), the mail
systems as aiosmtpd LMTP servers in this process (tests/fedutil.py). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import random
import smtplib
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fedutil import FakeSystem, Fed, message  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def tree_peak_rss_mb(pid: int) -> float:
    """Peak RSS of a process plus its children's (`fed serve --processes N`)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return peak_rss_mb(pid) + sum(peak_rss_mb(int(kid)) for kid in kids)


def big_message(n: int, size: int) -> bytes:
    """An RFC 5322 message of about `size` bytes (76-character lines, CRLF)."""
    line = (b"0123456789" * 8)[:76] + b"\r\n"
    body = line * (size // len(line))
    head = (f"From: big@outside.example\r\nTo: a@corp.example\r\nSubject: big {n}\r\n"
            f"Message-ID: <big{n}@bench>\r\n\r\n").encode()
    return head + body


def memory(args: argparse.Namespace) -> int:
    sink = FakeSystem("s1").start()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Fed(Path(tmp) / "fed", [sink],
                  # loopback clients are not limited per IP (a relay network)
                  extra=["--relay-network", "127.0.0.1/32",
                         "--max-size", str(args.size_mb * 2 << 20),
                         "--processes", str(args.processes)]).start()
        try:
            assert fed.proc is not None
            fed.client.put_entry("a@corp.example", sink.physical("a"))
            base = tree_peak_rss_mb(fed.proc.pid)
            data = [big_message(n, args.size_mb << 20) for n in range(args.clients)]
            codes: list[int] = []
            barrier = threading.Barrier(args.clients)

            def client(n: int) -> None:
                with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=300) as smtp:
                    smtp.ehlo("big.example")
                    barrier.wait(60)
                    refused = smtp.sendmail("big@outside.example", ["a@corp.example"], data[n])
                    codes.append(0 if refused else 250)

            started = time.monotonic()
            threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            accepted = time.monotonic() - started
            wait_for(lambda: len(sink.received) >= args.clients, timeout=600,
                     what="every big message at the sink")
            delivered = time.monotonic() - started
            peak = tree_peak_rss_mb(fed.proc.pid)
            ok = codes.count(250) == args.clients and all(
                len(m.data) >= args.size_mb << 20 for m in sink.received)
            print(f"fed memory ({args.processes} processes): {args.clients} clients x "
                  f"{args.size_mb} MB: accepted in "
                  f"{accepted:.1f} s, delivered in {delivered:.1f} s, "
                  f"peak RSS {peak:.0f} MB (idle {base:.0f} MB), "
                  f"{'all delivered intact' if ok else 'MISSING OR DAMAGED MESSAGES'}")
            return 0 if ok else 1
        finally:
            fed.stop()
            sink.stop()


def holds(args: argparse.Namespace) -> int:
    s1, s2 = FakeSystem("s1").start(), FakeSystem("s2").start()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Fed(Path(tmp) / "fed", [s1, s2], extra=["--workers", "8"]).start()
        try:
            client = fed.client
            addresses = [f"user{n}@corp.example" for n in range(args.addresses)]
            for n, address in enumerate(addresses):
                client.put_entry(address, s1.physical(f"user{n}"))
            acked: list[tuple[str, str]] = []  # (message id, address)
            stop = threading.Event()

            def sender(k: int) -> None:
                rnd = random.Random(k)
                with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=60) as smtp:
                    smtp.ehlo("flow.example")
                    n = 0
                    while not stop.is_set() and n < 100000:
                        address = rnd.choice(addresses)
                        msgid = f"f{k}-{n}@bench"
                        smtp.sendmail("sender@outside.example", [address],
                                      message("flow", msgid))
                        acked.append((f"<{msgid}>", address))
                        n += 1

            senders = [threading.Thread(target=sender, args=(k,)) for k in range(args.senders)]
            for t in senders:
                t.start()
            wait_for(lambda: len(acked) > 200, timeout=60, what="mail flowing")
            t0 = time.monotonic()
            client.hold(addresses)
            t1 = time.monotonic()
            # Every address is held now: anything s1 receives from here on broke the hold.
            s1_at_hold = len(s1.received)
            if args.flip == "batch":  # one POST /v1/flips: every mailbox, one transaction
                results = client.flip_many([([a], s1.physical(f"user{n}"), s2.physical(f"user{n}"))
                                            for n, a in enumerate(addresses)])
                assert sum(len(r.flipped) for r in results) == len(addresses)
            else:  # one POST /v1/flip per mailbox, 8 in parallel
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda n: client.flip([addresses[n]], s1.physical(f"user{n}"),
                                                        s2.physical(f"user{n}")),
                                  range(len(addresses))))
            t2 = time.monotonic()
            client.release(addresses)
            t3 = time.monotonic()
            time.sleep(0.5)  # mail keeps flowing after the release, now to s2
            stop.set()
            for t in senders:
                t.join(60)
            promised = {msgid for msgid, _ in acked}
            wait_for(lambda: promised <= set(s1.ids()) | set(s2.ids()), timeout=120,
                     what="every acknowledged message delivered")
            late = s1.received[s1_at_hold:]
            print(f"fed holds: {len(addresses)} addresses, {len(promised)} messages sent "
                  f"during the run: hold {t1 - t0:.2f} s, {len(addresses)} flips "
                  f"{t2 - t1:.2f} s, release {t3 - t2:.2f} s, total {t3 - t0:.2f} s; "
                  f"lost 0, delivered to s1 after the hold answered: {len(late)}")
            return 0 if not late else 1
        finally:
            fed.stop()
            s1.stop()
            s2.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--clients", type=int, default=50)
    m.add_argument("--size-mb", type=int, default=10)
    m.add_argument("--processes", type=int, default=1)
    h = sub.add_parser("holds")
    h.add_argument("--addresses", type=int, default=1000)
    h.add_argument("--senders", type=int, default=4)
    h.add_argument("--flip", choices=("batch", "one"), default="batch",
                   help="one POST /v1/flips for all (default) or one POST /v1/flip each")
    args = ap.parse_args()
    return memory(args) if args.what == "memory" else holds(args)


if __name__ == "__main__":
    sys.exit(main())
