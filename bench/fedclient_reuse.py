"""The fed client's kept-alive connection against one new connection per call.

Why: a pass of the engine makes tens to thousands of control calls (lookups, holds, flips
for every mailbox of a wave); the client used to open a TCP connection for each
(`urllib.request`). This starts a real fed on loopback and times N `GET /v1/queue` calls
with `FedClient` (one kept-alive HTTP/1.1 connection) next to the same calls made the old
way (`urllib.request.urlopen`, a connection per call), best of 3 rounds each.

Usage: `python bench/fedclient_reuse.py [N]` (default 500).
"""

from __future__ import annotations

import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reconciler.fedclient import FedClient

from fedutil import TOKEN, FakeSystem, Fed
from sysutil import free_port


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    with tempfile.TemporaryDirectory() as tmp:
        fed = Fed(Path(tmp) / "fed", [FakeSystem("s1", port=free_port())]).start()
        try:
            url = f"http://127.0.0.1:{fed.control_port}"
            client = FedClient(url, TOKEN)

            def kept() -> None:
                for _ in range(n):
                    client.queue()

            def per_call() -> None:
                request = urllib.request.Request(url + "/v1/queue", headers={
                    "Authorization": f"Bearer {TOKEN}"})
                for _ in range(n):
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        answer.read()

            results = {}
            for name, run in (("kept-alive (FedClient)", kept), ("per call (urllib)", per_call)):
                best = float("inf")
                for _ in range(3):
                    began = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - began)
                results[name] = best
                print(f"{name}: {n} calls in {best:.3f} s ({best / n * 1000:.2f} ms/call)")
            ours, peer = results.values()
            print(f"ratio kept-alive / per call: x{ours / peer:.2f}")
        finally:
            fed.kill()


if __name__ == "__main__":
    main()
