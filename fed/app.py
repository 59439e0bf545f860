"""Wiring: one asyncio loop running the SMTP listener, the control API and delivery.

Why one loop: the hold guarantee (``holds.py``) and the single-connection store
(``store.py``) both rely on every decision being made on one thread, in order. Blocking
work (the spool's file fsyncs, big file reads) goes to worker threads through
``asyncio.to_thread``; delivery's SMTP/LMTP client is asyncio itself. uvloop is used when
installed (see ``_loop_factory``).

Start-up: open the store, clean the spool after a possible crash (``Spool.recover``),
register the systems given on the command line, start delivery, then the two listeners,
then print ``fed ready smtp=HOST:PORT control=HOST:PORT`` (the line tests and supervisors
wait for).

Shutdown on SIGTERM/SIGINT, in the order that loses nothing: stop accepting connections,
refuse new DATA with 421, wait for spool writes in progress (their clients are owed an
answer), close the remaining SMTP sessions, stop the API, let in-flight deliveries record
their outcome, write the buffered outcomes, close the store. A kill -9 skips all this and
still loses nothing acknowledged; this order only avoids needless re-deliveries and
half-answered clients.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiosmtpd.smtp import SMTP

from .control import ControlAPI
from .dataphase import LeanSMTP
from .delivery import Deliverer, DeliverySettings
from .directory import Directory
from .holds import Holds
from .server import FedHandler
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
    hostname: str = "fed.invalid"
    max_size: int = 50 * 1024 * 1024
    max_rcpts: int = 100
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    hold_timeout: float = 120.0
    shutdown_grace: float = 30.0


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
    pending = deliverer.load()
    log.info("state %s: %d messages (%d recipients) queued, %d holds", config.state_dir,
             queued, pending, len(holds.held))
    spool.start()

    # The spool's group commit hands new recipients to delivery itself (Spool.on_queued).
    handler = FedHandler(directory, spool, config.domains, config.hostname, config.max_rcpts,
                         lambda: None)
    sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory() -> SMTP:
        session = LeanSMTP(handler, hostname=config.hostname, data_size_limit=config.max_size,
                           enable_SMTPUTF8=True, ident="mailferry fed")
        sessions.add(session)
        return session

    delivery_task = asyncio.create_task(deliverer.run(), name="delivery")
    smtp_server = await loop.create_server(factory, config.smtp_host, config.smtp_port)
    api = ControlAPI(config.token, directory, spool, holds, deliverer, config.hold_timeout)
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
    handler.stopping = True
    deadline = time.monotonic() + config.shutdown_grace
    while handler.writing and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for session in list(sessions):
        if session.transport is not None:
            session.transport.close()
    await runner.cleanup()
    await deliverer.stop(grace=max(0.0, deadline - time.monotonic()))
    delivery_task.cancel()
    await asyncio.gather(delivery_task, return_exceptions=True)
    await spool.close()
    log.info("group commit: %s", spool.stats())
    store.close()
    log.info("stopped")


def run(config: FedConfig) -> int:
    """Run fed in a fresh event loop; the process exit code."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every SMTP command at INFO; fed logs its own decisions instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the same asyncio API, with sockets, transports and timers
    in C (libuv), which is most of what fed's single core spends per message."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
