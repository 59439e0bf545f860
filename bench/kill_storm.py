#!/usr/bin/env python3
"""A kill -9 storm on fed and on Postfix, the same storm, in the same run.

    bench/kill_storm.py [--messages 5000] [--senders 8] [--kills 20] [--servers fed,postfix]

Eight senders push 5,000 messages (each its own Message-ID) to b@example.test; twenty
times, evenly over the run, the whole server is killed with SIGKILL (fed: its process;
Postfix: the process group of its master) and started again on the same queue. Both relay
to the same aiosmtpd SMTP sink in this process, which counts every Message-ID. Printed
per server: acknowledged, lost (acknowledged, never arrived: must be 0) and duplicates
(copies beyond the first) as a percentage of acknowledged, then fed/Postfix as a ratio.
Target (issue 14): fed below 0.5 % duplicates, 0 lost.

Postfix runs as a private instance (its own config and queue directory in a temporary
folder, as ../shared/bench/postfix_relay.sh does; nothing in /etc/postfix is touched),
with short retry times so that the drain after the storm does not wait for its defaults.
Needs root for Postfix (``--servers fed`` does not). Every loop is bounded in count and
time (tests/storm.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fedutil import FakeSystem, Fed  # noqa: E402
from pfdovecot import MASTER_CF  # noqa: E402
from storm import FedStormServer, StormResult, storm  # noqa: E402
from sysutil import free_port  # noqa: E402

RCPT = "b@example.test"


def wait_port(port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class PostfixStormServer:
    """A private Postfix relaying example.test to the sink; kill = SIGKILL of its master's
    process group, start = ``postfix start`` on the same queue."""

    def __init__(self, root: Path, sink_port: int) -> None:
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.port = free_port()
        for d in (self.conf, self.queue, root / "data"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(root / "data", "postfix", "postfix")
        # postsuper, run at each restart, writes the log as user postfix
        (root / "maillog").touch()
        shutil.chown(root / "maillog", "postfix", "postfix")
        (self.conf / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {root / 'data'}
maillog_file = {root / 'maillog'}
maillog_file_prefixes = {root}
myhostname = relay.example.invalid
mydomain = example.invalid
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
mynetworks = 127.0.0.0/8
relay_domains = example.test
transport_maps = inline:{{ example.test=smtp:[127.0.0.1]:{sink_port} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
""")
        # The suite's private-instance master.cf: one copy of what a bare Postfix needs.
        (self.conf / "master.cf").write_text(MASTER_CF.format(address="127.0.0.1",
                                                              smtp=self.port))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=60)

    def start(self) -> None:
        done = self._postfix("start")
        if done.returncode != 0 or not wait_port(self.port):
            raise RuntimeError(f"postfix did not start: {done.stderr} (see {self.root})")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            return
        for _ in range(200):  # bounded: until the listener is gone
            if not wait_port(self.port, timeout=0.05):
                break
            time.sleep(0.05)

    def idle(self) -> bool:
        shown = subprocess.run(["postqueue", "-c", str(self.conf), "-p"], capture_output=True,
                               text=True, timeout=30)
        return "Mail queue is empty" in shown.stdout

    def stop(self) -> None:
        if self.master_pid() is not None:
            self._postfix("stop")
            time.sleep(0.5)
            self.kill()


def run_fed(args: argparse.Namespace, tmp: Path) -> StormResult:
    sink = FakeSystem("sink", protocol="smtp").start()
    fed = Fed(tmp / "fed", [sink], domains=("example.test",),
              extra=["--workers", "8", "--relay-network", "127.0.0.0/8"])
    server = FedStormServer(fed)
    try:
        server.start()
        fed.client.put_entry(RCPT, sink.physical("b"))
        return storm(server, sink.ids, RCPT, messages=args.messages, senders=args.senders,
                     kills=args.kills, timeout=args.timeout)
    finally:
        fed.kill()
        sink.stop()


def run_postfix(args: argparse.Namespace, tmp: Path) -> StormResult:
    sink = FakeSystem("sink", protocol="smtp").start()
    server = PostfixStormServer(tmp / "postfix", sink.port)
    try:
        server.start()
        return storm(server, sink.ids, RCPT, messages=args.messages, senders=args.senders,
                     kills=args.kills, timeout=args.timeout)
    finally:
        server.stop()
        sink.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--timeout", type=float, default=900.0, help="per server (s)")
    p.add_argument("--servers", default="fed,postfix")
    args = p.parse_args()
    results: dict[str, StormResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # Postfix's daemons (user postfix) must reach its queue
        for name in args.servers.split(","):
            run = {"fed": run_fed, "postfix": run_postfix}[name]
            results[name] = run(args, Path(tmp))
            print(results[name].line(name), flush=True)
    if "fed" in results and "postfix" in results:
        fed, postfix = results["fed"], results["postfix"]
        ratio = (fed.duplicate_percent / postfix.duplicate_percent
                 if postfix.duplicate_percent else float("nan"))
        print(f"fed/postfix duplicate-rate ratio: {ratio:.2f}")
    return 1 if any(r.lost for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
