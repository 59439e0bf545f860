"""A private PostgreSQL server for tests: initdb in a temp folder, 127.0.0.1, stopped by PID.

The state store claims "any SQLAlchemy URL"; these helpers let a test prove it against a real
PostgreSQL (Debian's `postgresql` package, installed by bootstrap.sh). The cluster runs as
the `postgres` system user the package creates (initdb refuses root), on a free port, with
trust authentication on loopback only, and is removed with its folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sysutil import free_port


def pg_bindir() -> Path:
    """Debian's server binaries (the newest installed major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server not installed: bootstrap.sh installs `postgresql`")
    return Path(found[-1]).parent


class PrivatePostgres:
    """initdb + postgres in the foreground (its PID is ours to stop)."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.settings = dict(settings or {})  # postgres -c NAME=VALUE (a bench's limits)
        # Not under pytest's tmp folder: its parents are 0700 and the `postgres` user must
        # traverse every level.
        self.root = Path(tempfile.mkdtemp(prefix="mailferry-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _as_postgres(self, argv: list[str]) -> list[str]:
        return argv if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *argv]

    def start(self) -> PrivatePostgres:
        bindir = pg_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(self._as_postgres([str(bindir / "initdb"), "-D", str(self.data),
                                          "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                          "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        with open(self.root / "postgres.log", "wb") as log:
            self.process = subprocess.Popen(
                self._as_postgres([str(bindir / "postgres"), "-D", str(self.data), "-p",
                                   str(self.port), "-h", "127.0.0.1", "-k", str(self.root),
                                   "-c", "fsync=off",
                                   *(f"-c{k}={v}" for k, v in self.settings.items())]),
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                                    str(self.port)], capture_output=True, timeout=10)
            if ready.returncode == 0:
                break
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "postgres.log").read_text())
            time.sleep(0.2)
        else:
            raise RuntimeError("PostgreSQL did not start in 30 s")
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", "mailferry"], check=True, capture_output=True,
                       timeout=30)
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mailferry"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # smart shutdown; the postmaster is our child
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
