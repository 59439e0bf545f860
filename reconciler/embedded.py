"""Start the embedded default for a spec set: fed and every `maildir` system, as processes.

`reconcile serve` runs these in the foreground; the demo and the tests start them the same
way. They are real servers on 127.0.0.1 (SMTP, LMTP, HTTP), each its own process, so that
the reconciler reaches them only over sockets and a test can kill -9 any of them. Each
process is stopped by its PID, never by name.
"""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from reconciler.errors import MailferryError
from reconciler.secrets import ensure_file_secret
from reconciler.spec.model import SpecSet


@dataclass
class Server:
    """One started server process."""

    name: str
    process: subprocess.Popen[bytes]
    ready_line: str = ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


@dataclass
class Embedded:
    """The running embedded default."""

    servers: list[Server] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(name: str, argv: list[str], marker: str, log_path: Path,
           timeout: float = 20.0) -> Server:
    """Start `argv`, wait for a stdout line containing `marker`; stderr goes to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # NOTIFY_SOCKET is this process's (`reconcile serve` under systemd): it says READY
        # once every server is up, not each server on its own.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                   env={**env, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MailferryError(
                f"{name} exited with code {process.returncode} before it was ready; "
                f"see {log_path}")
        readable, _, _ = select.select([process.stdout], [], [], 0.2)
        if not readable:
            continue
        chunk = os.read(process.stdout.fileno(), 4096)
        buffer += chunk
        for line in buffer.decode(errors="replace").splitlines():
            if marker in line:
                return Server(name, process, line.strip())
    process.kill()
    process.wait()
    raise MailferryError(f"{name} was not ready within {timeout:.0f} s; see {log_path}")


def _hostport(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def _host_network(host: str) -> str:
    """A host (IP or name) -> IP/32 or IP/128."""
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name: its loopback resolution is what connects from here
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    return f"{ip}/{ip.max_prefixlen}"


def fed_argv(specs: SpecSet) -> list[str]:
    """The `fed serve` command line for the specs' FedHub."""
    fed = specs.fed
    argv = [sys.executable, "-m", "fed", "serve", "--smtp", str(fed.smtp),
            "--control", _hostport(fed.control_url), "--state-dir", fed.state_dir]
    argv += ["--token-file", fed.token.file] if fed.token.file else \
        ["--token-env", str(fed.token.env)]
    for domain in fed.domains:
        argv += ["--domain", domain]
    if fed.tls_cert is not None and fed.tls_key is not None:
        argv += ["--tls-cert", fed.tls_cert, "--tls-key", fed.tls_key]
    relay = list(fed.relay_networks)
    for system in specs.systems.values():  # others are registered by the engine
        if system.driver == "maildir":
            argv += ["--system", f"{system.name}={system.lmtp}/lmtp"]
            # The systems started here submit their outgoing mail to fed from their
            # submission host: those, and only those, relay without AUTH (invariant 8).
            if system.submission is not None:
                relay.append(_host_network(system.submission.host))
    for network in dict.fromkeys(relay):
        argv += ["--relay-network", network]
    return argv


def start_embedded(specs: SpecSet, *, log_dir: Path | None = None) -> Embedded:
    """Start fed and every maildir system of the specs; stop them all if one fails."""
    fed = specs.fed
    logs = log_dir or Path(fed.state_dir).parent / "logs"
    ensure_file_secret(fed.token)
    embedded = Embedded()
    try:
        embedded.servers.append(_start("fed", fed_argv(specs), "ready", logs / "fed.log"))
        for system in specs.systems.values():
            if system.driver != "maildir":  # real servers are started by their admins
                continue
            argv = [sys.executable, "-m", "maildir_system", "serve", "--name", system.name,
                    "--root", system.root, "--lmtp", str(system.lmtp),
                    "--submission", str(system.submission), "--fed", str(fed.smtp)]
            embedded.servers.append(
                _start(system.name, argv, "ready", logs / f"{system.name}.log"))
    except BaseException:
        embedded.stop()
        raise
    return embedded
