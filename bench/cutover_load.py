"""Cutover under load: mailboxes move in waves between two real Postfix + Dovecot systems
while mail keeps arriving through fed and from the systems' own local users.

Why: a migration in waves always moves mailboxes into a target that already receives mail
for the earlier waves; that is where fed's pooled connections meet a Postfix whose tables
just changed (docs/postfix-dovecot.md, "A target that is already live"). This runs that case
at scale on the real servers (`tests/pfdovecot.py`, fed and the reconciler as in the tests)
and counts every acknowledged message by Message-ID in every mailbox:

    sudo .venv/bin/python bench/cutover_load.py [--mailboxes 100] [--waves 4]
         [--fed-rate 80] [--local-rate 20] [--kill]

Waves take the mailboxes in chunks of `--wave-size` (default mailboxes/waves), each to the
other system; once every chunk has moved, the next waves move them back. `--kill` kills the
reconciler with SIGKILL at a random step of every second wave and runs it again. The last
line is

    cutover under load: acknowledged N, lost L, duplicated D, misplaced M, longest hold H s

Targets: lost 0, duplicated 0, misplaced 0, longest hold under 2 s. Needs root and the
Debian packages of the tests (./bootstrap.sh test installs them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pfworld import PfWorld
from waves import Load, account, collect, drain, longest_hold, run_wave
from world import policy

FAILPOINTS = [f"{step}:{where}" for step in ("E2", "E4", "E5", "E9", "E15", "E41")
              for where in ("after-action", "after-commit")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mailboxes", type=int, default=100)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--fed-rate", type=float, default=80.0, help="messages/s through fed")
    p.add_argument("--local-rate", type=float, default=20.0,
                   help="messages/s from local users, into the systems' Postfix")
    p.add_argument("--wave-size", type=int, default=0,
                   help="mailboxes per wave (default mailboxes/waves); fewer chunks than "
                   "waves move back and forth")
    p.add_argument("--kill", action="store_true", help="kill -9 the reconciler in every "
                   "second wave at a random step, then run it again")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="mailferry-cutover-"))
    world = PfWorld(root)
    log = print if not args.json else (lambda _line: None)
    try:
        width = len(str(args.mailboxes))
        addresses = [f"u{n:0{width}d}@corp.example" for n in range(1, args.mailboxes + 1)]
        size = args.wave_size or -(-len(addresses) // args.waves)
        groups = [addresses[i:i + size] for i in range(0, len(addresses), size)]
        pol = policy("bench", deleteSource={"after": "0s", "consent": True}, diary=False,
                     maxParallel=max(50, size))
        state = f"sqlite:///{root / 'state.db'}"
        layout = dict.fromkeys(addresses, "pf1")
        started = time.monotonic()
        run_wave(world, root / "specs-0", state, layout, pol, log=log)
        log(f"created {len(addresses)} mailboxes on pf1 in {time.monotonic() - started:.1f} s")
        load = Load(world.fed_port, {n: h.smtp_port for n, h in world.hosts.items()},
                    lambda: addresses, fed_rate=args.fed_rate, local_rate=args.local_rate,
                    streams=4, limit=3600).start()
        time.sleep(2)
        for wave in range(args.waves):
            group = groups[wave % len(groups)]
            target = "pf2" if layout[group[0]] == "pf1" else "pf1"
            layout.update(dict.fromkeys(group, target))
            failpoint = rng.choice(FAILPOINTS) if args.kill and wave % 2 == 1 else None
            t0 = time.monotonic()
            run_wave(world, root / f"specs-{wave + 1}", state, layout, pol,
                     failpoint=failpoint, log=log)
            log(f"wave {wave + 1}: {len(group)} mailboxes -> {target}"
                f"{f' (killed at {failpoint})' if failpoint else ''} in "
                f"{time.monotonic() - t0:.1f} s, {len(load.acked)} acknowledged so far")
        time.sleep(2)
        load.stop()
        engine = world.engine(root / f"specs-{args.waves}", state)
        drain(engine, world.hosts.values(), timeout=300)
        result = account(load.acked, collect(world.hosts, addresses),
                         lambda rcpt: f"{layout[rcpt]}/{rcpt}")
        holds = [longest_hold(engine)]
        queue = engine.fed.queue()
        shunt = list((Path(engine.specs.fed.state_dir) / "spool" / "shunt").glob("*"))
        log(f"fed: pending {queue.pending}, shunted {queue.shunted}, shunt files {len(shunt)}; "
            f"refused at submission {len(load.refused)}; "
            f"{time.monotonic() - started:.0f} s in all")
        for what, items in (("lost", result.lost), ("duplicated", result.duplicated),
                            ("misplaced", result.misplaced)):
            for item in items[:5]:
                log(f"  {what}: {item}")
        if args.json:
            print(json.dumps({"acknowledged": result.acknowledged, "lost": len(result.lost),
                              "duplicated": len(result.duplicated),
                              "misplaced": len(result.misplaced),
                              "longest_hold_s": max(holds, default=0.0),
                              "shunted": queue.shunted}))
        print(result.line(max(holds, default=0.0)))
        ok = not (result.lost or result.duplicated or result.misplaced)
        return 0 if ok and max(holds, default=0.0) < 2.0 else 1
    finally:
        world.stop()


if __name__ == "__main__":
    sys.exit(main())
