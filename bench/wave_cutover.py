"""The reconciler's cutover of a whole wave under load: hold, flip and release (E5-E9) of
N mailboxes in one pass, while mail keeps arriving through fed.

Why: `bench/fed_load.py holds` times fed's side alone (one hold, one batch flip, one
release called by hand); this times what the reconciler does for a wave, every check
included: the E5-E8 checks of each mailbox, the hold, the proof that the target takes each
ADP2, the flip, BOX1's redirects, the release, and each mailbox's transitions recorded.

The embedded world of the tests (fed, s1 and s2 as processes on 127.0.0.1, `tests/world.py`):
N mailboxes (one alias each) are created on s1, moved to s2 and taken to state 4 (addresses
formed) without timing; then `--senders` clients send through fed to random addresses of
the wave (bounded: `--rate` messages/s each, at most 10 minutes) and one engine pass runs
E5-E9 for all of them. Prints the pass's wall time, the span from the first hold taking
effect to the last E9 recorded, the longest single hold fed reports (`held_seconds`), the
fed calls made, and whether every acknowledged message reached a mailbox of its address
exactly once (counted by Message-ID in s1 and s2).

    python bench/wave_cutover.py [--mailboxes 1000] [--senders 4] [--rate 25]

`MAILFERRY_REPO=/path/to/checkout` runs another checkout's reconciler with the same world
(the figure before a change: `MAILFERRY_REPO=/work/main`). `PROFILE=1` prints the pass's
cProfile (cumulative).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(os.environ.get("MAILFERRY_REPO") or Path(__file__).resolve().parents[1])
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])

from sqlalchemy import select  # noqa: E402

from reconciler.engine import ApplyReport, Engine  # noqa: E402
from reconciler.state.model import Event, Migration  # noqa: E402

from waves import Load  # noqa: E402
from world import World, mailbox_message_ids, placement, policy  # noqa: E402


def states(engine: Engine) -> Counter[int]:
    with engine.store.session() as session:
        return Counter(m.state for m in session.scalars(select(Migration)))


def to_state_4(world: World, root: Path, n: int) -> tuple[Engine, list[dict[str, Any]]]:
    boxes = [{"address": f"w{i}@corp.example", "aliases": [f"w{i}.a@corp.example"]}
             for i in range(n)]
    state = f"sqlite:///{root / 'state.db'}"
    keep = policy("keep", deleteSource="never", maxParallel=n)
    world.engine(world.write(root / "v1", [keep, placement("home", "s1", boxes,
                                                            policy_name="keep")]), state).apply()
    engine = world.engine(world.write(root / "v2", [keep, placement(
        "wave", "s2", boxes, policy_name="keep")]), state)
    engine.register_systems()
    for _ in range(10):
        if states(engine) == Counter({4: n}):
            return engine, boxes
        due = [c for c in engine.plan().due() if c.step != "E5"]
        engine.run_changes(due, ApplyReport(), engine.clock(), purge=False)
    raise SystemExit(f"not all at state 4: {states(engine)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mailboxes", type=int, default=1000)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--rate", type=float, default=25.0, help="messages/s per sender")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mf-wave-"))
    world = World(root)
    try:
        began = time.monotonic()
        engine, boxes = to_state_4(world, root, args.mailboxes)
        print(f"{args.mailboxes} mailboxes at state 4 in {time.monotonic() - began:.1f} s "
              f"(reconciler from {REPO})")
        rcpts = [a for b in boxes for a in (b["address"], *b["aliases"])]
        load = Load(engine.specs.fed.smtp.port, {}, lambda: rcpts,
                    fed_rate=args.rate * args.senders, streams=args.senders,
                    limit=600.0).start()
        calls: Counter[str] = Counter()
        real = engine.fed._call

        def counted(method: str, path: str, body: Any = None, ok: Any = ()) -> Any:
            if not path.startswith("/v1/systems/") or method != "POST":
                calls[f"{method} {path}"] += 1
            else:
                calls[f"{method} /v1/systems/*/refresh"] += 1
            return real(method, path, body, ok)
        engine.fed._call = counted  # type: ignore[method-assign]
        time.sleep(1.0)  # mail flowing
        report = ApplyReport()
        due = [c for c in engine.plan().due() if c.step == "E5"]
        profile = cProfile.Profile() if os.environ.get("PROFILE") else None
        t0 = time.monotonic()
        if profile is not None:
            profile.enable()
        engine.run_changes(due, report, engine.clock(), purge=False, chain=True)
        if profile is not None:
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        wall = time.monotonic() - t0
        time.sleep(0.5)
        load.stop()
        with engine.store.session() as session:
            e9 = list(session.scalars(select(Event).where(Event.step == "E9")))
            longest = max((float(json.loads(e.detail).get("held_seconds", 0)) for e in e9),
                          default=0.0)
        print(f"one pass, E5-E9 of {args.mailboxes} mailboxes under load "
              f"({args.senders} senders): pass {wall:.2f} s; longest hold (fed) {longest:.2f} s; "
              f"states {dict(states(engine))}; errors {len(report.errors)}")
        print("fed calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(calls.items())))
        deadline = time.monotonic() + 900  # bounded; the machine may be busy
        while engine.fed.queue().pending and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"fed's queue {time.monotonic() - deadline + 900:.0f} s after the pass: "
              f"{engine.fed.queue()}")
        home = {a: b["address"] for b in boxes for a in (b["address"], *b["aliases"])}
        found: Counter[str] = Counter()
        for b in boxes:
            for system in ("s1", "s2"):
                found.update(mailbox_message_ids(engine, system, b["address"]))
        acked = [s.mid for s in load.acked if s.rcpt in home]
        lost = [m for m in acked if found[m] == 0]
        twice = [m for m in acked if found[m] > 1]
        print(f"acknowledged {len(acked)}, refused {len(load.refused)}, lost {len(lost)}, "
              f"duplicated {len(twice)}")
        return 0 if not lost and not twice else 1
    finally:
        world.stop()


if __name__ == "__main__":
    sys.exit(main())
