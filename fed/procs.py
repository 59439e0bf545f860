"""``fed serve --processes N``: one machine, N fed nodes, one SMTP port.

Why processes: one Python process is CPU-bound on its per-connection work; the
node protocol (``node_agent.py``, docs/fed-multinode.md) already lets several nodes share
one directory and one set of holds, so N processes are simply N nodes on one machine.
Node 0 keeps ``STATE-DIR`` itself (a fed that ran with one process keeps its spool, its
node name and its queue), node K > 0 uses ``STATE-DIR/node-K``; all share the shared
database (default ``sqlite:///STATE-DIR/shared.db``).

Why the parent binds the sockets, and why one SMTP socket for all: the parent opens one
listening SMTP socket and hands it to every child (``--smtp-fd``); each child's event loop
waits on it, and whichever node is idle when a client connects accepts first, while a node
busy relaying its last message is still in its callbacks. At one message per connection
(the relay benchmark's load, and most mail) that steering is worth its thundering herd (N
wake-ups a connection, the losers' ``accept`` finds nothing): against one SO_REUSEPORT
socket per child, where the kernel hashes each connection to a node whether busy or not,
``bench/fed_ab.sh`` with two processes measured one client x1.126 (six pairs), ten clients
x1.076 (five), 50 clients x0.996 (four); the two nodes took 2,101 / 2,099 of one client's
messages and 2,148 / 2,052 of 50 clients'. The parent keeps its copy open, so the port
stays bound and listening whatever the children do: a dead node's share goes to the others
at once (with SO_REUSEPORT it waited in the dead node's backlog for the restart), no other
program can take the port, and port 0 works (the kernel picks one port for all). The
control API is one per node, on consecutive ports (node K on CONTROL+K; kernel-chosen ports
when CONTROL is 0), also bound by the parent: holds, flips and releases through any of them
are honoured by all nodes; ``GET /v1/queue``, queue-id operations and ``/metrics`` are per
node. The ready line names the SMTP port and node 0's control port.

Supervision: the parent prints ``fed ready ...`` once every child has printed its own;
a child that exits before its first ready line aborts the start (a configuration error
would fail the same way again); a child that dies later is restarted (its spool is
recovered at its start, so every acknowledged message is delivered), with a back-off
when it keeps dying. SIGTERM/SIGINT to the parent are passed on to every child, which
stops gracefully (app.py); the parent waits for them. A child sees its stdin close when
the parent dies (even by kill -9) and then stops gracefully too.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailferry.mail.backoff import backoff
from mailferry.service import notify_ready
from mailferry.signals import SignalEvents

from .app import READY

log = logging.getLogger("fed.procs")


def node_dir(state_dir: Path, k: int) -> Path:
    """Node K's state directory: STATE-DIR for node 0, STATE-DIR/node-K after it."""
    return state_dir if k == 0 else state_dir / f"node-{k}"


def listener(host: str, port: int) -> socket.socket:
    """One listening socket, inheritable by the children; port 0: kernel-chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def control_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening control socket per node: ports PORT..PORT+count-1 (or kernel-chosen)."""
    socks: list[socket.socket] = []
    try:
        for k in range(count):
            socks.append(listener(host, port + k if port else 0))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


@dataclass
class Child:
    """One node process and what the parent knows of it."""

    k: int
    argv: list[str]
    smtp: socket.socket
    control: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    restarts: int = 0

    def start(self) -> None:
        """Spawn the node with its two inherited sockets; a thread watches its stdout."""
        self.ready = threading.Event()
        fds = (self.smtp.fileno(), self.control.fileno())
        argv = [*self.argv, "--smtp-fd", str(fds[0]), "--control-fd", str(fds[1])]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=fds)
        self.started_at = time.monotonic()
        threading.Thread(target=self._watch, args=(self.proc, self.ready), daemon=True,
                         name=f"node-{self.k}-stdout").start()

    def _watch(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        """Set `ready` at the child's ready line; pass its other output on."""
        assert proc.stdout is not None
        for line in proc.stdout:
            if READY in line.decode(errors="replace"):
                ready.set()
            else:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


def child_argv(argv: list[str], state_dir: Path, k: int, shared_db: str,
               node_name: str | None) -> list[str]:
    """The child's command line: the parent's, with the node's own settings last (they win)."""
    own = ["--processes", "1", "--state-dir", str(node_dir(state_dir, k)),
           "--shared-db", shared_db]
    if node_name:
        own += ["--node-name", node_name if k == 0 else f"{node_name}-{k}"]
    return [sys.executable, "-m", "fed", *argv, *own]


def supervise(argv: list[str], count: int, smtp: tuple[str, int], control: tuple[str, int],
              state_dir: Path, shared_db: str, node_name: str | None,
              grace: float = 60.0) -> int:
    """Run `count` node processes until SIGTERM/SIGINT; the exit code."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for k in range(count, count + 64):  # a spool left by a larger --processes
        spool = node_dir(state_dir, k) / "spool"
        if spool.is_dir() and any(spool.iterdir()):
            log.warning("%s holds a spool that no node of --processes %d delivers",
                        spool, count)
    smtp_sock = listener(smtp[0], smtp[1])
    try:
        control_socks = control_listeners(control[0], control[1], count)
    except OSError:
        smtp_sock.close()
        raise
    children = [Child(k, child_argv(argv, state_dir, k, shared_db, node_name),
                      smtp_sock, control_socks[k]) for k in range(count)]
    stop = threading.Event()  # set on SIGTERM/SIGINT (never by the handler itself: signals.py)
    signals = SignalEvents(stop)
    for child in children:
        child.start()
    code = _wait_ready(children, stop)
    if code is None:
        host, port = smtp_sock.getsockname()[:2]
        chost, cport = control_socks[0].getsockname()[:2]
        print(f"{READY} smtp={host}:{port} control={chost}:{cport}", flush=True)
        notify_ready(f"{count} nodes serving smtp {host}:{port}")
        log.info("%d nodes ready, control ports %s", count,
                 " ".join(str(s.getsockname()[1]) for s in control_socks))
        _watch_children(children, stop)
        code = 0
    for child in children:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("node %d did not stop within %.0f s: killed", child.k, grace)
            child.proc.kill()
            child.proc.wait()
    for sock in [smtp_sock, *control_socks]:
        sock.close()
    signals.restore()
    return code


def _wait_ready(children: list[Child], stop: threading.Event) -> int | None:
    """None once every child is ready; else the exit code to leave with."""
    while not all(child.ready.is_set() for child in children):
        for child in children:
            assert child.proc is not None
            rc = child.proc.poll()
            if rc is not None:
                log.error("node %d exited with %d before it was ready", child.k, rc)
                return rc or 1
        if stop.wait(0.05):
            return 1
    return None


def _watch_children(children: list[Child], stop: threading.Event) -> None:
    """Restart children that die, until stopped; back off for one that keeps dying."""
    due: dict[int, float] = {}
    while not stop.wait(0.2):
        now = time.monotonic()
        for child in children:
            assert child.proc is not None
            if child.k in due:
                if now >= due[child.k]:
                    del due[child.k]
                    child.restarts += 1
                    log.warning("restarting node %d (restart %d)", child.k, child.restarts)
                    child.start()
                continue
            rc = child.proc.poll()
            if rc is None:
                continue
            lived = now - child.started_at
            delay = 0.0 if lived > 10.0 else backoff(child.restarts + 1, 0.5, 30.0)
            log.error("node %d (pid %d) exited with %d after %.1f s; restart in %.1f s",
                      child.k, child.proc.pid, rc, lived, delay)
            due[child.k] = now + delay
