"""An asyncio event loop in a private thread, for blocking facades over asyncio clients.

Who uses it: the blocking HTTP client (`mailferry.mail.http.HttpClient`) and the blocking
IMAP session (`mailferry.mail.imap.blocking.BlockingImap`). Their callers are synchronous
code (the engine's steps, a CLI, the station agent's poll loop); the clients underneath are
asyncio ones whose state (a connection pool, an IMAP reader task) must stay alive between
calls, which ``asyncio.run`` per call would not allow, and a caller may itself run in
another loop's thread, where a nested loop cannot run. So each facade owns one loop in one
daemon thread and hands it one coroutine per call.

The thread is a daemon so that a facade nobody closed cannot hold the interpreter's exit;
`stop` (called by the facade's ``close()`` and by its finalizer, which also runs at
interpreter exit) cancels what is left, shuts the loop's default executor down (the DNS
lookups' threads), stops the loop and joins the thread, so nothing is left running.

After ``fork`` the child has the parent's loop object but not its thread, and the loop's
selector (an epoll instance) is *shared* with the parent: touching it in the child would
unregister the parent's sockets. `owned` says whether the current process started the loop;
a facade that finds it is not the owner forgets the inherited loop without touching it and
starts a new one (`stop` in the child does nothing either).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
STOP_WAIT = 10.0  # seconds `stop` waits for the last coroutine and for the thread


class LoopThread:
    """One event loop running in one daemon thread, from construction until `stop`."""

    def __init__(self, name: str) -> None:
        self.pid = os.getpid()
        # A selector loop explicitly: a uvloop policy set by the process (fed sets one) has
        # no business in a private client thread, and its state after fork is not ours.
        self.loop = asyncio.SelectorEventLoop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    @property
    def owned(self) -> bool:
        """True in the process that started the loop (False in a forked child)."""
        return self.pid == os.getpid()

    @property
    def alive(self) -> bool:
        return self.owned and self.thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (its exception is raised here)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(f"{self.thread.name}: a blocking call from the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, last: Callable[[], Coroutine[Any, Any, object]] | None = None) -> None:
        """Run `last` (closing connections), cancel what is left, stop the loop and join the
        thread (each bounded by STOP_WAIT). Idempotent; does nothing in a forked child."""
        if not self.alive:
            return

        async def finish() -> None:
            if last is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(last(), STOP_WAIT)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_default_executor()

        done = asyncio.run_coroutine_threadsafe(finish(), self.loop)
        if threading.current_thread() is self.thread:
            # Called from the loop itself (a finalizer run by the garbage collector there):
            # the loop stops once `finish` is done; nobody can wait for it here.
            done.add_done_callback(lambda _: self.loop.stop())
            return
        with contextlib.suppress(Exception, concurrent.futures.CancelledError):
            done.result(2 * STOP_WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_WAIT)
        if not self.thread.is_alive():
            self.loop.close()
