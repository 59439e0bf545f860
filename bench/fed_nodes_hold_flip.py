"""Hold and flip propagation across fed nodes (NOTIFY vs the 100 ms poll); a cutover.

Why: a migration wave moves many mailboxes at once, and while they are held mail for them
waits; and every hold and flip made through one node must reach every other node before
it counts. Two pairs of fed nodes run side by side, each pair on its own database of one
private PostgreSQL, each node with its own spool: one pair wakes on LISTEN/NOTIFY (the
default), the other with `--no-node-notify` (the 100 ms poll, as before). In the same run:

1. propagation, samples alternating between the pairs: a flip through node A until node B
   routes by it (B's in-memory directory, read through its control API every 2 ms), and a
   hold through A until the call returns (it waits for B's acknowledgement), each then
   undone (flip back, release);
2. the cutover of 1,000 addresses on each pair while a sender per node (helpers.mail's
   Sender: a connection a message) writes to the wave's addresses in a shuffled order:
   E8 hold with the up-sync check, E9 flips one call per address
   alternating between the nodes, release until every held message is delivered, and the
   time until the other node routes the last flip. It checks what it measures: nothing
   reaches the old system after the hold returned, every acknowledged message is
   delivered exactly once.

    .venv/bin/python bench/fed_nodes_hold_flip.py [--addresses 1000] [--samples 60] [--json]

Needs PostgreSQL's server binaries (bootstrap.sh installs them); uses the test helpers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fedutil import FakeSystem, Fed
from helpers.mail import Sender
from helpers.waiting import wait_for
from pgutil import PrivatePostgres


def flow(fed: Fed, prefix: str, addresses: list[str]) -> Sender:
    """Mail to the wave's addresses (each in turn, in an order of its own) through one node
    until finished (bounded: 100,000 messages, 10 minutes)."""
    order = random.Random(prefix).sample(addresses, len(addresses))
    return Sender(fed.smtp_port, order, tag=f"{prefix}-", count=100_000, pause=0.005,
                  seconds=600, sender="sender@outside.example", timeout=60)


MODES = {"notify": [], "poll": ["--no-node-notify"]}


class Pair:
    """Two fed nodes on one database, with their two fake systems."""

    def __init__(self, root: Path, mode: str, url: str) -> None:
        self.mode = mode
        self.s1 = FakeSystem("s1").start()
        self.s2 = FakeSystem("s2", protocol="smtp").start()
        self.nodes: list[Fed] = []
        for name in ("a", "b"):
            self.nodes.append(Fed(root / f"{mode}-{name}", [self.s1, self.s2], extra=[
                "--shared-db", url, "--node-name", name, "--node-lease", "5",
                "--workers", "16", *MODES[mode]]).start())
        self.a, self.b = self.nodes

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        self.s1.stop()
        self.s2.stop()


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `predicate` holds, looked at every 2 ms."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"no propagation within {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - t0


def propagation(pair: Pair, i: int, rng: random.Random) -> tuple[float, float]:
    """One sample: (flip through A until B routes by it, hold through A until it returns)."""
    a, b = pair.a, pair.b
    address = f"probe{i % 4}@corp.example"
    old, new = pair.s1.physical(f"probe{i % 4}"), pair.s2.physical(f"probe{i % 4}")
    if a.client.lookup(address) is None:
        a.client.put_entry(address, old)
        until(lambda: b.client.lookup(address) == old)
    # A random pause first: the previous sample ended just after B's poll, and a change
    # made right then would always wait a whole poll interval (unfair to the poll).
    time.sleep(rng.uniform(0.0, 0.1))
    a.client.flip([address], old, new)
    flip_s = until(lambda: b.client.lookup(address) == new)
    time.sleep(rng.uniform(0.0, 0.1))
    t0 = time.monotonic()
    a.client.hold([address])
    hold_s = time.monotonic() - t0
    a.client.release([address])
    a.client.flip([address], new, old)
    until(lambda: b.client.lookup(address) == old)
    return flip_s, hold_s


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(1000 * statistics.median(ordered), 1),
            "p95_ms": round(1000 * ordered[max(0, int(0.95 * len(ordered)) - 1)], 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def cutover(pair: Pair, n: int) -> dict[str, Any]:
    """Hold, flip and release `n` addresses through both nodes while mail flows."""
    a, b, s1, s2 = pair.a, pair.b, pair.s1, pair.s2
    addresses = [f"user{i:05d}@corp.example" for i in range(n)]
    a.client.upsync("s1", {f"user{i:05d}@s1.invalid": [addr]
                           for i, addr in enumerate(addresses)})
    # The target lists the same addresses (prestaged BOX2s, E4 done): E8 can pass.
    a.client.upsync("s2", {f"user{i:05d}@s2.invalid": [addr]
                           for i, addr in enumerate(addresses)})
    wait_for(lambda: b.client.lookup(addresses[-1]) is not None, what="directory on b")
    s1.received.clear()
    s2.received.clear()
    flows = [flow(a, "a", addresses), flow(b, "b", addresses)]
    for sender in flows:
        sender.start()
    wait_for(lambda: len(s1.received) >= 50, timeout=60, what="mail flowing")

    began = t0 = time.monotonic()
    a.client.hold(addresses, require_upsync={"system": "s2"})
    hold_s = time.monotonic() - t0
    at_hold = len(s1.received)

    t0 = time.monotonic()
    for i, address in enumerate(addresses):
        (a if i % 2 else b).client.flip([address], f"user{i:05d}@s1.invalid",
                                        f"user{i:05d}@s2.invalid")
    flip_s = time.monotonic() - t0
    last = n - 2  # flipped through b: seen on a
    seen_s = until(lambda: a.client.lookup(addresses[last]) == f"user{last:05d}@s2.invalid", 30)

    acked = [m for sender in flows for m in sender.finish(60)]
    held = a.client.queue().held + b.client.queue().held

    t0 = time.monotonic()
    b.client.release(addresses)
    release_call_s = time.monotonic() - t0
    wait_for(lambda: len(s1.received) + len(s2.received) >= len(acked), timeout=600,
             what="every held message delivered")
    drained_s = time.monotonic() - t0
    ids = s1.ids() + s2.ids()
    return {
        "addresses": n, "messages_acknowledged": len(acked), "held_at_release": held,
        "hold_s": round(hold_s, 3), "flip_s": round(flip_s, 3),
        "flip_per_address_ms": round(1000 * flip_s / n, 2),
        "last_flip_seen_on_other_node_ms": round(1000 * seen_s, 1),
        "release_call_s": round(release_call_s, 3),
        "release_until_delivered_s": round(drained_s, 3),
        "cutover_s": round(time.monotonic() - began, 3),
        "old_system_after_hold": len(s1.received) - at_hold,
        "lost": len(set(acked) - set(ids)), "duplicated": len(ids) - len(set(ids)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addresses", type=int, default=1000)
    p.add_argument("--samples", type=int, default=60, help="propagation samples per mode")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fed-nodes-bench-"))
    pg = PrivatePostgres().start()
    pairs: dict[str, Pair] = {}
    try:
        with psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                             dbname="postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE fed_poll")
        urls = {"notify": pg.url, "poll": pg.url.rsplit("/", 1)[0] + "/fed_poll"}
        for mode, url in urls.items():
            pairs[mode] = Pair(root, mode, url)
        samples: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in pairs}
        rng = random.Random(18)
        for i in range(args.samples):
            for mode in (("notify", "poll") if i % 2 else ("poll", "notify")):
                flip_s, hold_s = propagation(pairs[mode], i, rng)
                samples[mode][0].append(flip_s)
                samples[mode][1].append(hold_s)
        result: dict[str, Any] = {"samples": args.samples, "nodes_per_mode": 2}
        for mode in ("notify", "poll"):
            result[f"{mode}_flip_seen_on_other_node"] = stats(samples[mode][0])
            result[f"{mode}_hold_acknowledged_by_both"] = stats(samples[mode][1])
        for kind in ("flip_seen_on_other_node", "hold_acknowledged_by_both"):
            result[f"ratio_poll_over_notify_{kind}_median"] = round(
                result[f"poll_{kind}"]["median_ms"]
                / max(0.1, result[f"notify_{kind}"]["median_ms"]), 1)
        for mode in ("poll", "notify"):
            result[f"{mode}_cutover"] = cutover(pairs[mode], args.addresses)
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:52} {value}")
        ok = all(result[f"{m}_cutover"][k] == 0 for m in pairs
                 for k in ("old_system_after_hold", "lost", "duplicated"))
        return 0 if ok else 1
    finally:
        for pair in pairs.values():
            pair.stop()
        pg.stop()


if __name__ == "__main__":
    raise SystemExit(main())
