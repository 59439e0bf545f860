"""Time to hold, flip and release 1,000 addresses on two fed nodes while mail flows.

Why: a migration wave moves many mailboxes at once, and while they are held mail for them
waits. This measures the three steps of the cutover (E8 hold with the up-sync check, E9
flip, release until every held message is delivered) on two fed nodes sharing a private
PostgreSQL, each with its own spool, with a sender per node writing to random addresses of
the wave the whole time. It checks what it measures: nothing reaches the old system after
the hold returned, every acknowledged message is delivered exactly once.

    .venv/bin/python bench/fed_nodes_hold_flip.py [--addresses 1000] [--json]

Needs PostgreSQL's server binaries (bootstrap.sh installs them); uses the test helpers.
"""

from __future__ import annotations

import argparse
import json
import random
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fedutil import FakeSystem, Fed, message
from helpers.waiting import wait_for
from pgutil import PrivatePostgres


class Flow(threading.Thread):
    """Sends to random addresses of the wave through one node until stopped."""

    def __init__(self, fed: Fed, prefix: str, addresses: list[str]) -> None:
        super().__init__(daemon=True)
        self.fed, self.prefix, self.addresses = fed, prefix, addresses
        self.acked: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        rng = random.Random(self.prefix)
        with smtplib.SMTP("127.0.0.1", self.fed.smtp_port, timeout=60) as client:
            client.ehlo("bench.example")
            n = 0
            while not self.halt.is_set():
                client.mail("sender@outside.example")
                client.rcpt(rng.choice(self.addresses))
                code, _ = client.data(message("wave", f"{self.prefix}-{n}@b"))
                if code == 250:
                    self.acked.append(f"<{self.prefix}-{n}@b>")
                n += 1
                self.halt.wait(0.005)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addresses", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args()
    n = args.addresses
    root = Path(tempfile.mkdtemp(prefix="fed-nodes-bench-"))
    pg = PrivatePostgres().start()
    s1, s2 = FakeSystem("s1").start(), FakeSystem("s2", protocol="smtp").start()
    nodes: list[Fed] = []
    try:
        for name in ("a", "b"):
            nodes.append(Fed(root / name, [s1, s2], extra=[
                "--shared-db", pg.url, "--node-name", name, "--node-lease", "5",
                "--workers", "16"]).start())
        a, b = nodes
        addresses = [f"user{i:05d}@corp.example" for i in range(n)]
        a.client.upsync("s1", {f"user{i:05d}@s1.invalid": [addr]
                               for i, addr in enumerate(addresses)})
        # The target lists the same addresses (prestaged BOX2s, E4 done): E8 can pass.
        a.client.upsync("s2", {f"user{i:05d}@s2.invalid": [addr]
                               for i, addr in enumerate(addresses)})
        wait_for(lambda: b.client.lookup(addresses[-1]) is not None, what="directory on b")
        flows = [Flow(a, "a", addresses), Flow(b, "b", addresses)]
        for flow in flows:
            flow.start()
        wait_for(lambda: len(s1.received) >= 50, timeout=60, what="mail flowing")

        t0 = time.monotonic()
        a.client.hold(addresses, require_upsync={"system": "s2"})
        hold_s = time.monotonic() - t0
        at_hold = len(s1.received)

        t0 = time.monotonic()
        for i, address in enumerate(addresses):
            (a if i % 2 else b).client.flip([address], f"user{i:05d}@s1.invalid",
                                            f"user{i:05d}@s2.invalid")
        flip_s = time.monotonic() - t0

        for flow in flows:
            flow.halt.set()
            flow.join(60)
        acked = [m for flow in flows for m in flow.acked]
        held = a.client.queue().held + b.client.queue().held

        t0 = time.monotonic()
        b.client.release(addresses)
        release_call_s = time.monotonic() - t0
        wait_for(lambda: len(s1.received) + len(s2.received) >= len(acked), timeout=600,
                 what="every held message delivered")
        drained_s = time.monotonic() - t0

        ids = s1.ids() + s2.ids()
        result = {
            "addresses": n, "nodes": 2, "messages_acknowledged": len(acked),
            "held_at_release": held,
            "hold_s": round(hold_s, 3), "flip_s": round(flip_s, 3),
            "flip_per_address_ms": round(1000 * flip_s / n, 2),
            "release_call_s": round(release_call_s, 3),
            "release_until_delivered_s": round(drained_s, 3),
            "old_system_after_hold": len(s1.received) - at_hold,
            "lost": len(set(acked) - set(ids)), "duplicated": len(ids) - len(set(ids)),
        }
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:28} {value}")
        ok = result["old_system_after_hold"] == 0 and result["lost"] == 0 \
            and result["duplicated"] == 0
        return 0 if ok else 1
    finally:
        for node in nodes:
            node.kill()
        s1.stop()
        s2.stop()
        pg.stop()


if __name__ == "__main__":
    raise SystemExit(main())
