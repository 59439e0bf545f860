"""Adoption at scale: import a 10,000-user admin system, and what a step costs on it.

Why: `reconcile import` reads the whole system from the servers (Dovecot's userdb iteration,
every user's home, every map of Postfix's lists), and every step on an adopted system
re-renders mailferry's overlay (one line per mailbox, plus a `postfix reload` when the
transport table changes). This measures both on the real servers, built as the tests build
them (`tests/adminlayouts.py`: layout a, users as full addresses in a passwd-file, `hash:`
maps, an alias per user), next to their peers in the same run:

- import: `reconcile adopt` then `reconcile import` as subprocesses (wall time, peak RSS of
  each process) next to the floor, the same reads done by the bare tools
  (`doveadm user '*'`, `doveadm user -f home` in the same batches, `postmap -s` of both
  maps);
- a step: `set_via_fed` on and off (what E5 and E9 do to the source) on `--steps` mailboxes
  of the adopted system, next to the same on an owned system (`tests/pfdovecot.py`,
  mailferry's own layout) holding as many mailboxes, in the same run.

    sudo .venv/bin/python bench/adopt_scale.py [--users 10000] [--steps 20]

Needs root and the Debian packages of the tests (./bootstrap.sh test installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reconciler.drivers.base import mailbox_id_for
from reconciler.drivers.pfdovecot_learn import BATCH

from adminlayouts import AdminHost
from pfdovecot import MailHost, make_root
from pfworld import PfWorld


def timed_process(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv[3:]} failed: {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out.decode()


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({done.returncode}): {done.stderr[-1000:]}")


def floor(host: AdminHost, users: list[str]) -> float:
    """The bare tools' reads of what import reads."""
    conf = str(host.dovecot_conf)
    started = time.perf_counter()
    run(["doveadm", "-c", conf, "user", "*"])
    for start in range(0, len(users), BATCH):
        run(["doveadm", "-c", conf, "user", "-f", "home", *users[start:start + BATCH]])
    for name in ("vmailbox", "virtual"):
        run(["postmap", "-c", str(host.etc), "-s", f"hash:{host.etc}/{name}"])
    return time.perf_counter() - started


def step_cost(driver: object, boxes: list[str]) -> float:
    """Mean seconds of one set_via_fed (on, then off) over `boxes`."""
    started = time.perf_counter()
    for box in boxes:
        driver.set_via_fed(box, True)  # type: ignore[attr-defined]
        driver.set_via_fed(box, False)  # type: ignore[attr-defined]
    return (time.perf_counter() - started) / (2 * len(boxes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    users = [f"user{n:05d}@corp.example" for n in range(args.users)]

    def hosts(fed_port: int) -> dict[str, MailHost]:
        return {"big": AdminHost("big", make_root("mailferry-big-"), fed_port, layout="passwd",
                                 users=tuple(users),
                                 aliases={f"alias.{u}": u for u in users}),
                "own": MailHost("own", make_root("mailferry-own-"), fed_port)}

    root = Path(tempfile.mkdtemp(prefix="mailferry-adopt-bench-"))
    world = PfWorld(root, hosts=hosts)
    try:
        big = world.hosts["big"]
        assert isinstance(big, AdminHost)
        specs = world.write(root / "specs", [])
        state = root / "state.db"
        base = [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state",
                str(state)]
        adopt_s, adopt_mb, _ = timed_process([*base, "adopt", "big"], root)
        floor_s = floor(big, users)  # (Dovecot's iteration needs the overlay passwd-file)
        import_s, import_mb, out = timed_process([*base, "import", "big"], root)
        assert f"{args.users} mailboxes of big" in out, out
        plan_s, plan_mb, out = timed_process([*base, "--plan"], root)
        assert "No changes" in out, out[-500:]

        engine = world.engine(specs, f"sqlite:///{state}")
        adopted = engine.drivers["big"]
        owned = engine.drivers["own"]
        owned.ping()  # configure the owned layout
        owned_boxes = [mailbox_id_for(u) for u in users]
        tables = owned.tables  # type: ignore[attr-defined]
        # The passwd-file first (as the driver would have written it over time): the write
        # below then adds no user Dovecot must be seen to know, one doveadm call each.
        own = world.hosts["own"]
        Path(tables.table_path("passwd")).write_text("".join(
            f"{b}:{{CRYPT}}!:{tables.uid}:{tables.gid}::{tables.home(b)}::\n"
            for b in sorted(owned_boxes)))
        del own
        with tables.write() as conn:  # as many mailboxes as the adopted system, in one pass
            conn.executemany("INSERT OR IGNORE INTO accounts (mailbox_id, access_addresses) "
                             "VALUES (?, ?)", [(b, json.dumps([u])) for b, u in
                                               zip(owned_boxes, users, strict=True)])
        sample = owned_boxes[: args.steps]
        owned_s = step_cost(owned, sample)
        adopted_s = step_cost(adopted, sample)
        print(f"import of {args.users} users: adopt {adopt_s:.2f} s ({adopt_mb:.0f} MB peak), "
              f"import {import_s:.2f} s ({import_mb:.0f} MB peak), plan {plan_s:.2f} s "
              f"({plan_mb:.0f} MB); the bare tools' reads {floor_s:.2f} s: import / floor = "
              f"{import_s / floor_s:.1f}")
        print(f"a step (set_via_fed) with {args.users} mailboxes: adopted "
              f"{adopted_s * 1000:.0f} ms, owned {owned_s * 1000:.0f} ms per call: "
              f"adopted / owned = {adopted_s / owned_s:.2f}")
    finally:
        world.stop()


if __name__ == "__main__":
    main()
