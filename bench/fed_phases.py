#!/usr/bin/env python3
"""Where a lone client's message goes: each SMTP step against one fed process, timed.

    bench/fed_phases.py [N]        (as root: smtp-sink drops to nobody)
    bench/fed_phases.py N --port PORT [--rcpt ADDRESS]   (a server already running)

Starts smtp-sink and one ``fed serve`` (relay to the sink, as bench/fed_profile.sh), then
sends N messages of ~2 KB one after the other, a new connection each (as smtp-source
does), timing connect + banner, EHLO, MAIL, RCPT, DATA, the data until its 250 (the DATA
phase and the group commit) and QUIT; prints the median and mean of each step (the first
50 messages are warm-up) and fed's group-commit line. Bounded: N messages (default 500),
every socket read with a 10 s timeout. Ports: SINK_PORT / SMTP_PORT / CONTROL_PORT
(13326 / 13330 / 13331).

``--port`` times a server that is already listening on 127.0.0.1:PORT instead (the same
client, the same steps; nothing started): ``bench/smtp_floor.py --mode durable``, a Postfix,
a fed started otherwise (with ``HOLD``, say). Step by step against the floor it shows which
of a lone client's round trips fed lengthens, and by how much (docs/fed.md, "Ninth round").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent
STEPS = ["connect+banner", "EHLO", "MAIL", "RCPT", "DATA", "data->250", "QUIT"]
BODY = b"Subject: x\r\nMessage-ID: <x@bench>\r\n\r\n" + (b"x" * 74 + b"\r\n") * 27


def reply(stream: BinaryIO) -> bytes:
    """The last line of one (possibly multi-line) reply."""
    for _ in range(100):
        line = stream.readline()
        if line[3:4] != b"-":
            return line
    raise RuntimeError("endless reply")


def timed(port: int, count: int, rcpt: str) -> dict[str, list[float]]:
    """Send `count` messages to 127.0.0.1:`port`, one connection each; each step's times
    (the first 50 messages are warm-up, not kept)."""
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    commands = (b"EHLO client.example\r\n", b"MAIL FROM:<a@example.test>\r\n",
                b"RCPT TO:<" + rcpt.encode() + b">\r\n", b"DATA\r\n", BODY + b".\r\n",
                b"QUIT\r\n")
    for n in range(count):
        marks = [time.perf_counter()]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            stream = sock.makefile("rb")
            reply(stream)
            marks.append(time.perf_counter())
            for command in commands:
                sock.sendall(command)
                last = reply(stream)
                marks.append(time.perf_counter())
            if not last.startswith(b"221"):
                raise RuntimeError(f"unexpected reply {last!r}")
        if n >= 50:
            for k, step in enumerate(STEPS):
                times[step].append(marks[k + 1] - marks[k])
    return times


def report(times: dict[str, list[float]]) -> None:
    total = 0.0
    for step, got in times.items():
        got.sort()
        total += statistics.mean(got)
        print(f"{step:15s} median {1000 * got[len(got) // 2]:.3f} ms, "
              f"mean {1000 * statistics.mean(got):.3f} ms")
    print(f"one message, mean of the sum: {1000 * total:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", nargs="?", type=int, default=500)
    parser.add_argument("--port", type=int, help="time this running server; start nothing")
    parser.add_argument("--rcpt", default="b@sink.invalid")
    args = parser.parse_args()
    if args.count <= 50 or args.count > 100_000:
        parser.error("N must be 51..100000 (the first 50 are warm-up)")
    if args.port is not None:
        report(timed(args.port, args.count, args.rcpt))
        return 0
    sink_port = int(os.environ.get("SINK_PORT", "13326"))
    smtp_port = int(os.environ.get("SMTP_PORT", "13330"))
    control_port = int(os.environ.get("CONTROL_PORT", "13331"))
    with tempfile.TemporaryDirectory() as work:
        token = Path(work) / "token"
        token.write_text("bench-token-" + str(os.getpid()))
        token.chmod(0o600)
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{sink_port}",
                                 "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        errors = Path(work) / "fed.err"
        with errors.open("w") as err:
            fed = subprocess.Popen(
                [sys.executable, "-m", "fed", "serve", "--smtp", f"127.0.0.1:{smtp_port}",
                 "--control", f"127.0.0.1:{control_port}", "--state-dir", f"{work}/state",
                 "--token-file", str(token), "--domain", "example.test",
                 "--system", f"sink=127.0.0.1:{sink_port}/smtp",
                 "--relay-network", "127.0.0.0/8", "--workers", "16"],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert fed.stdout is not None
            for line in fed.stdout:  # bounded: fed prints "ready" or exits
                if "ready" in line:
                    break
            times = timed(smtp_port, args.count, args.rcpt)
        finally:
            fed.send_signal(signal.SIGTERM)
            fed.wait(60)
            sink.kill()
            sink.wait(10)
        report(times)
        for line in errors.read_text().splitlines():
            if "group commit: " in line:
                print(line.split("fed: ", 1)[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
