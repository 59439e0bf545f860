"""Wiring: one asyncio loop running the SMTP listener, the control API and delivery.

Why one loop: the hold guarantee (``holds.py``) and the single-connection store
(``store.py``) both rely on every decision being made on one thread, in order. Blocking
work (file fsyncs, SMTP client transactions) goes to worker threads through
``asyncio.to_thread`` and comes back to the loop to record its result.

Start-up: open the store, clean the spool after a possible crash (``Spool.recover``),
register the systems given on the command line, start delivery, then the two listeners,
then print ``fed ready smtp=HOST:PORT control=HOST:PORT`` (the line tests and supervisors
wait for).

Shutdown on SIGTERM/SIGINT, in the order that loses nothing: stop accepting connections,
refuse new DATA with 421, let messages already streaming finish and be spooled (their
clients are owed an answer), tell the remaining SMTP sessions 421 and close them, stop
the API, let in-flight deliveries record their outcome, close the store. A kill -9 skips
all this and still loses nothing acknowledged; this order only avoids needless
re-deliveries and half-answered clients.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiosmtpd.smtp import SMTP

from . import logs, metrics
from .control import ControlAPI
from .delivery import Deliverer, DeliverySettings
from .directory import Directory
from .holds import Holds
from .server import FedHandler, SmtpSettings, drain, make_factory
from .spool import Spool
from .store import Store

log = logging.getLogger("fed")


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


async def serve(config: FedConfig) -> None:
    """Run fed until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.state_dir / "fed.db")
    directory = Directory(store)
    spool = Spool(config.state_dir / "spool", store)
    queued = spool.recover()
    for name, host, port, protocol in config.systems:
        directory.put_system(name, host, port, protocol)
    holds = Holds(store)
    deliverer = Deliverer(store, spool, directory, holds, config.delivery)
    log.info("state %s: %d messages queued, %d holds", config.state_dir, queued, len(holds.held))

    handler = FedHandler(directory, spool, config.domains, config.smtp, deliverer.wake)
    sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
    factory = make_factory(handler, config.smtp, sessions.add)

    delivery_task = asyncio.create_task(deliverer.run(), name="delivery")
    smtp_server = await loop.create_server(factory, config.smtp_host, config.smtp_port)
    api = ControlAPI(config.token, directory, spool, holds, deliverer, config.hold_timeout,
                     config.metrics_public)
    metrics.install_state(
        lambda: api.admin.state(sum(1 for s in sessions if s.transport is not None)))
    # A hold call may be waiting for a slow delivery: do not let it delay shutdown long.
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.control_host, config.control_port)
    await site.start()

    smtp_addr = smtp_server.sockets[0].getsockname()
    control_addr = runner.addresses[0]
    print(f"fed ready smtp={smtp_addr[0]}:{smtp_addr[1]} "
          f"control={control_addr[0]}:{control_addr[1]}", flush=True)
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
    store.close()
    log.info("stopped")


def run(config: FedConfig) -> int:
    """Run fed in a fresh event loop; the process exit code."""
    logs.setup(config.log_format)
    asyncio.run(serve(config))
    return 0
