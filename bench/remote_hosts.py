"""What SSH costs: the Postfix + Dovecot driver on hosts in network namespaces, next to the
same driver on local hosts, in the same run.

Why: a system with ``host: ssh://...`` runs every postconf/postmap/doveadm and every table
write through one multiplexed OpenSSH connection (`reconciler.drivers.sshhost`). Each of
those is a session on the control master plus the remote user's shell starting: this
measures what that adds to one step (a table write: read the tables, replace the changed
ones with postmap) and to a wave of mailboxes, against the local driver (`LocalHost`) on the
same machine with the same servers:

    sudo .venv/bin/python bench/remote_hosts.py [--mailboxes 100] [--steps 20]

Worlds: `tests/pfworld.py` (pf1, pf2 on 127.0.0.1) and `tests/netns.py` (pfa, pfb in two
namespaces, each with its own sshd). Lines printed:

    command round trip: local X ms, ssh Y ms (+Z ms)
    step (table write): local X ms, ssh Y ms (+Z ms, ratio R)
    wave of N mailboxes: local X s, ssh Y s (+Z s, +W ms per mailbox, ratio R)
    TLS on every hop: wave ssh Y s, ssh+tls T s (+V ms per mailbox, ratio R)

"ssh" is the namespace world in cleartext (``tls=False``), "ssh+tls" the same with TLS
required on every hop (IMAP STARTTLS, fed's and the driver's SMTP/LMTP STARTTLS, a private
CA; `tests/netns.py`): what TLS adds per mailbox.

No mail load: the figures are the reconciler's own time. Needs root and the packages of
the tests (./bootstrap.sh test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver

from netns import NetnsWorld
from pfworld import PfWorld
from waves import run_wave
from world import World, policy


def command_ms(driver: PostfixDovecotDriver, n: int) -> float:
    """Median of `postconf -h relayhost` on the system's host."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        driver.host.run(["postconf", "-c", driver.options.postfix_config_dir, "-h", "relayhost"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def step_ms(driver: PostfixDovecotDriver, n: int) -> float:
    """Median of one table write (a redirect set, then cleared: virtual_alias changes)."""
    box = "bench=corp.example"
    driver.create_mailbox(box, internal_address=f"bench@{driver.name}.internal")
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        driver.set_redirect(box, f"{box}@elsewhere.invalid" if i % 2 == 0 else None)
        times.append(time.perf_counter() - t0)
    driver.delete_mailbox(box)
    return statistics.median(times) * 1000


def wave_s(world: World, root: Path, source: str, target: str, mailboxes: int) -> float:
    """Create `mailboxes` on source (not timed), then move them all to target (timed)."""
    addresses = [f"w{n:03d}@corp.example" for n in range(mailboxes)]
    pol = policy("bench", deleteSource={"after": "0s", "consent": True}, diary=False,
                 maxParallel=max(50, mailboxes))
    state = f"sqlite:///{root / 'state.db'}"
    run_wave(world, root / "specs-0", state, dict.fromkeys(addresses, source), pol)
    t0 = time.monotonic()
    run_wave(world, root / "specs-1", state, dict.fromkeys(addresses, target), pol)
    return time.monotonic() - t0


def shell_start_ms() -> float:
    """The remote user's shell with its rc file, run here (sshd runs `$SHELL -c` per command;
    bash reads ~/.bashrc when sshd starts it): part of every SSH round trip on this machine."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", ". ~/.bashrc >/dev/null 2>&1; true"], check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mailboxes", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailferry-remote-bench-"))
    figures: dict[str, Any] = {}
    for kind in ("local", "ssh", "tls"):
        (root / kind).mkdir()
    def measure(kind: str, world: World, source: str, target: str) -> None:
        engine = world.engine(world.base_dir, f"sqlite:///{root / kind / 'probe.db'}")
        driver = engine.drivers[target]
        assert isinstance(driver, PostfixDovecotDriver)
        driver.ping()  # configured, connected: not part of the figures
        figures[f"{kind}_command_ms"] = command_ms(driver, args.steps)
        figures[f"{kind}_step_ms"] = step_ms(driver, args.steps)
        figures[f"{kind}_wave_s"] = wave_s(world, root / kind, source, target, args.mailboxes)

    local = PfWorld(root / "local")
    try:
        measure("local", local, "pf1", "pf2")
    finally:
        local.stop()
    # One namespace world at a time: both would name their namespaces alike (per PID).
    for kind, tls in (("ssh", False), ("tls", True)):
        remote = NetnsWorld(root / f"remote-{kind}", tls=tls)
        try:
            measure(kind, remote, "pfa", "pfb")
        finally:
            remote.stop()
    figures["shell_start_ms"] = shell_start_ms()
    figures["mailboxes"] = args.mailboxes
    if args.json:
        print(json.dumps(figures))
        return 0
    lc, sc = figures["local_command_ms"], figures["ssh_command_ms"]
    ls, ss = figures["local_step_ms"], figures["ssh_step_ms"]
    lw, sw = figures["local_wave_s"], figures["ssh_wave_s"]
    print(f"command round trip: local {lc:.1f} ms, ssh {sc:.1f} ms (+{sc - lc:.1f} ms; "
          f"of which the remote shell with ~/.bashrc ~{figures['shell_start_ms']:.0f} ms here)")
    print(f"step (table write): local {ls:.1f} ms, ssh {ss:.1f} ms (+{ss - ls:.1f} ms, "
          f"ratio {ss / ls:.2f})")
    print(f"wave of {args.mailboxes} mailboxes: local {lw:.1f} s, ssh {sw:.1f} s "
          f"(+{sw - lw:.1f} s, +{(sw - lw) / args.mailboxes * 1000:.0f} ms per mailbox, "
          f"ratio {sw / lw:.2f})")
    tc, ts, tw = figures["tls_command_ms"], figures["tls_step_ms"], figures["tls_wave_s"]
    print(f"TLS on every hop: command {sc:.1f} -> {tc:.1f} ms, step {ss:.1f} -> {ts:.1f} ms, "
          f"wave ssh {sw:.1f} s, ssh+tls {tw:.1f} s "
          f"(+{(tw - sw) / args.mailboxes * 1000:.0f} ms per mailbox, ratio {tw / sw:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
