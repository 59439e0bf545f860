"""Run the station API in a background thread, on its own event loop.

Why. The reconciler's engine, the demo and the tests are synchronous code; they need the
station API *beside* them, not instead of them: `reconcile --watch` keeps reconciling while
stations poll, the demo drives a whole migration in one process, and a test starts the API,
runs a station agent as a subprocess against it and then inspects the state store. So the API
gets a thread of its own with a private asyncio loop, and a tiny synchronous handle:
`start()` returns once the socket is listening (so `.url` is immediately usable, even with
port 0, because we bind the socket ourselves before handing it to aiohttp), `stop()` shuts
the site down and joins the thread. Binding 127.0.0.1 by default: exposing the API to
workstations is a deliberate deployment choice (a reverse proxy with TLS in front).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from aiohttp import web

from reconciler.api.stations import DriverFor, TargetInfo, make_app
from reconciler.state.store import Store


class BackgroundApp:
    """An aiohttp application served from a background thread (port 0: a free port); the
    station API and the status page (`reconciler.web`) both run this way."""

    name = "app"

    def __init__(self, make: Callable[[], web.Application], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.host = host
        self.port = port
        self._make = make
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:41234`."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        """Listen and serve; return when the socket accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} server already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # SO_REUSEADDR lets a restarted server take the same port again (tests do this to
        # simulate an API outage; an operator restarting the reconciler does too).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(sock,),
                                        name=f"{self.name}:{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name} server did not start in time")
        if self._error is not None:
            raise RuntimeError(f"{self.name} server failed to start: {self._error}")
        return self

    def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            # A fresh application per start: aiohttp apps are frozen once served.
            runner = web.AppRunner(self._make(), access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
            self._runner = runner
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            sock.close()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = None
        self._thread = None
        self._runner = None
        self._ready.clear()
        self._error = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class StationApiServer(BackgroundApp):
    """The station API served from a background thread (port 0: a free port)."""

    name = "station API"

    def __init__(self, store: Store, driver_for: DriverFor, target_info: TargetInfo, *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self._args = (store, driver_for, target_info)
        super().__init__(lambda: make_app(*self._args), host=host, port=port)
