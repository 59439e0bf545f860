"""Wiring: one asyncio loop running the SMTP listener, the control API and delivery.

Why one loop: the hold guarantee (``holds.py``) and the single-connection store
(``store.py``) both rely on every decision being made on one thread, in order. Blocking
work (the spool's file fsyncs, big file reads) goes to worker threads through
``asyncio.to_thread``; delivery's SMTP/LMTP client is asyncio itself. uvloop is used when
installed (see ``_loop_factory``).

Start-up: open the store, clean the spool after a possible crash (``Spool.recover``),
open the shared database and load the directory and holds from it (``node_agent.py``: no
delivery starts before this node honours the holds), register the systems given on the
command line, start delivery, then the two listeners,
then print ``fed ready smtp=HOST:PORT control=HOST:PORT`` (the line tests and supervisors
wait for).

Shutdown on SIGTERM/SIGINT, in the order that loses nothing: stop accepting connections,
refuse new DATA with 421, let messages already streaming finish and be spooled (their
clients are owed an answer), tell the remaining SMTP sessions 421 and close them, stop
the API, let in-flight deliveries record their outcome, write the buffered outcomes, close
the store. A kill -9 skips all this and still loses nothing acknowledged; this order only
avoids needless re-deliveries and half-answered clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from mailferry.service import notify_ready

from .admin.control import ControlAPI
from .delivery.scheduler import Deliverer, DeliverySettings
from .queue.spool import Spool
from .queue.store import Store
from .routing.directory import Directory
from .routing.holds import Holds
from .routing.node_agent import NodeAgent
from .routing.nodes import NodeRegistry
from .routing.shared_db import SharedDB, default_url, import_legacy
from .smtp.protocol import SMTPProtocol
from .smtp.server import FedHandler, SmtpSettings, drain, make_factory
from .telemetry import logs, metrics

log = logging.getLogger("fed")
READY = "fed ready"  # the start of the line printed once serving


@dataclass
class FedConfig:
    """Everything `fed serve` needs."""

    smtp_host: str
    smtp_port: int
    control_host: str
    control_port: int
    state_dir: Path
    token: str
    domains: list[str]
    systems: list[tuple[str, str, int, str]] = field(default_factory=list)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    hold_timeout: float = 120.0
    shutdown_grace: float = 30.0
    metrics_public: bool = False
    log_format: str = "text"
    shared_db: str | None = None  # SQLAlchemy URL; None: sqlite:///<state dir>/shared.db
    node_name: str | None = None  # None: host name + a hash of the state dir (stable)
    node_lease: float = 10.0
    node_poll: float = 0.1      # the version-counter poll without a listener (SQLite, ...)
    node_notify: bool = True    # wake on PostgreSQL LISTEN/NOTIFY (routing/notify.py)
    node_safety_poll: float = 5.0  # the poll while the listener is connected
    smtp_fd: int | None = None  # a listening socket inherited from `--processes` (procs.py)
    control_fd: int | None = None


def node_name(config: FedConfig) -> str:
    """This node's name in the nodes table: stable across restarts of the same spool."""
    if config.node_name:
        return config.node_name
    digest = hashlib.sha256(str(config.state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


async def serve(config: FedConfig) -> None:
    """Run fed until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.state_dir / "fed.db")
    shared = SharedDB(config.shared_db or default_url(str(config.state_dir)))
    if import_legacy(shared, str(config.state_dir / "fed.db")):
        log.info("imported the directory and holds of %s into the shared database",
                 config.state_dir / "fed.db")
    directory = Directory(shared)
    spool = Spool(config.state_dir / "spool", store)
    queued = spool.recover()
    holds = Holds(shared, directory, NodeRegistry(shared), store, spool.waiting)
    # Silent for longer than this, a node has surely stopped delivering (nodes.py).
    dead_after = config.node_lease + config.delivery.timeout + 1.0
    # The identity a restart of this node presents again (a pid would change).
    identity = f"{socket.gethostname()}:{config.state_dir.resolve()}"
    agent = NodeAgent(node_name(config), shared, directory, holds, config.node_lease,
                      dead_after, identity, config.node_poll, notify=config.node_notify,
                      safety_poll=config.node_safety_poll)
    await agent.start()
    for name, host, port, protocol in config.systems:
        directory.put_system(name, host, port, protocol)
    deliverer = Deliverer(store, spool, directory, holds, config.delivery)
    agent.on_refresh = holds.on_slot = deliverer.wake
    pending = deliverer.load()
    log.info("state %s: %d messages (%d recipients) queued, %d holds", config.state_dir,
             queued, pending, len(holds.held))
    spool.start()

    # The spool's group commit hands new recipients to delivery itself (Spool.on_queued).
    handler = FedHandler(directory, spool, config.domains, config.smtp, lambda: None)
    sessions: weakref.WeakSet[SMTPProtocol] = weakref.WeakSet()
    factory = make_factory(handler, config.smtp, sessions.add)

    agent_task = asyncio.create_task(agent.run(), name="node-agent")
    delivery_task = asyncio.create_task(deliverer.run(), name="delivery")
    if config.smtp_fd is not None:
        inherited = socket.socket(fileno=config.smtp_fd)
        smtp_server = await loop.create_server(factory, sock=inherited)
        loop.add_reader(0, _parent_watch, loop, stop)
    else:
        smtp_server = await loop.create_server(factory, config.smtp_host, config.smtp_port)
    api = ControlAPI(config.token, directory, spool, holds, deliverer, config.hold_timeout,
                     config.metrics_public, node=agent.name)
    metrics.set_node(agent.name)
    metrics.install_state(
        lambda: api.admin.state(sum(1 for s in sessions if s.transport is not None)))
    # A hold call may be waiting for a slow delivery: do not let it delay shutdown long.
    application = api.app()
    application.router.add_get("/v1/nodes", agent.nodes_view)
    runner = web.AppRunner(application, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site: web.BaseSite
    if config.control_fd is not None:
        site = web.SockSite(runner, socket.socket(fileno=config.control_fd))
    else:
        site = web.TCPSite(runner, config.control_host, config.control_port)
    await site.start()

    smtp_addr = smtp_server.sockets[0].getsockname()
    control_addr = runner.addresses[0]
    host = str(control_addr[0])
    await agent.announce(f"[{host}]:{control_addr[1]}" if ":" in host
                         else f"{host}:{control_addr[1]}")
    log.info("node %s (pid %d), shared database %s", agent.name, os.getpid(),
             shared.engine.url.render_as_string())
    print(f"{READY} smtp={smtp_addr[0]}:{smtp_addr[1]} "
          f"control={control_addr[0]}:{control_addr[1]}", flush=True)
    if config.smtp_fd is None:  # a node of --processes: its parent tells systemd
        notify_ready(f"serving smtp {smtp_addr[0]}:{smtp_addr[1]}")
    log.info("serving domains %s", ", ".join(config.domains))

    await stop.wait()
    log.info("shutting down")
    smtp_server.close()
    deadline = time.monotonic() + config.shutdown_grace
    await drain(handler, sessions, deadline)
    await runner.cleanup()
    await deliverer.stop(grace=max(0.0, deadline - time.monotonic()))
    delivery_task.cancel()
    await asyncio.gather(delivery_task, return_exceptions=True)
    await spool.close()
    log.info("group commit: %s", spool.stats())
    await agent.stop()
    agent_task.cancel()
    await asyncio.gather(agent_task, return_exceptions=True)
    shared.close()
    store.close()
    log.info("stopped")


def _parent_watch(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """A node of `--processes`: its stdin closing means the parent is gone (even kill -9)."""
    if not os.read(0, 4096):
        loop.remove_reader(0)
        log.warning("the parent process is gone: stopping")
        stop.set()


def run(config: FedConfig) -> int:
    """Run fed in a fresh event loop; the process exit code."""
    logs.setup(config.log_format)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the same asyncio API, with sockets, transports and timers
    in C (libuv), which is most of what fed's single core spends per message."""
    try:
        import uvloop  # optional: not installed on Windows (pyproject marks it so)
    except ImportError:
        return None
    # Note: uvloop's transports are not asyncio.Transport subclasses (server.py's
    # _writable() checks what a transport can do, not its class).
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
