"""A private Radicale CalDAV/CardDAV server for tests: temp storage, free port, stopped by PID.

Why real Radicale: the mover's diary sync speaks WebDAV (PROPFIND, extended MKCOL,
conditional PUT); a real server checks our requests the way a customer's will.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sysutil import free_port


class Radicale:
    """`python -m radicale` on 127.0.0.1 with htpasswd (plain) users."""

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "users").write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str) -> str:
        return f"http://127.0.0.1:{self.port}/{user}/"

    def start(self) -> Radicale:
        log = open(self.root / "radicale.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radicale", "--server-hosts", f"127.0.0.1:{self.port}",
             "--storage-filesystem-folder", str(self.root / "collections"),
             "--auth-type", "htpasswd", "--auth-htpasswd-filename", str(self.root / "users"),
             "--auth-htpasswd-encryption", "plain"], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"radicale exited; see {self.root / 'radicale.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("radicale did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
