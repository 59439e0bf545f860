"""A throttling IMAP proxy in front of a real server (a private Dovecot): what Microsoft 365
or Gmail answer to a client that takes too much of them, on a schedule, and what the
client did (connections open at each moment, messages appended when).

It relays both directions response by response and command by command (a line and its
literals), so what it injects never lands inside a literal:

- `refuse`: the APPEND commands (counted over all connections, from 1) answered
  `NO [THROTTLED]` with Exchange Online's text, their literals read and dropped, nothing
  forwarded to the server;
- `bye`: the APPEND commands answered with an early `* BYE [UNAVAILABLE]`, then the
  connection closed (nothing of that APPEND reaches the server);
- `limit` (with `limit_after`: once that many APPENDs passed): a login while more than
  `limit` connections are open is answered `NO [LIMIT] Too many simultaneous connections`;
- `commands`: other commands by their first words (`{"UID FETCH": {3}}`, `{"EXAMINE":
  {1}}`), counted over all connections from 1, answered `NO [UNAVAILABLE]` unforwarded;
- `max_rate`: an APPEND while more than `max_rate` messages were appended in the last
  second is answered `NO [THROTTLED]` (a provider's per-user rate limit, for the bench);
- `penalty` (count, seconds): after `count` refusals within 10 s every APPEND and login
  is refused for `seconds` (the lock-out providers give clients that keep hammering).

It runs its own event loop in a thread, so a mover in the test's thread (or another
process) talks to it over TCP on 127.0.0.1 like any server. Observations are kept in
`events` (monotonic time, kind, value) for the test to assert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Iterable

from helpers.loop_server import LoopServer

_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r\n$")
THROTTLED = b"NO [THROTTLED] Request is throttled. Suggested Backoff Time: 500 milliseconds"
BYE = b"* BYE [UNAVAILABLE] Server busy, try again later\r\n"
LIMIT = b"NO [LIMIT] Too many simultaneous connections. (Failure)"
UNAVAILABLE = b"NO [UNAVAILABLE] Server busy, try again later"


class ThrottlingProxy:
    """See the module's docstring; `close()` stops it."""

    def __init__(self, port: int, *, refuse: Iterable[int] = (), bye: Iterable[int] = (),
                 limit: int | None = None, limit_after: int = 0,
                 max_rate: float | None = None,
                 penalty: tuple[int, float] | None = None,
                 commands: dict[str, set[int]] | None = None) -> None:
        self.target = port
        self.refuse, self.bye = set(refuse), set(bye)
        self.limit, self.limit_after, self.max_rate = limit, limit_after, max_rate
        self._recent: deque[tuple[float, int]] = deque()  # (time, messages) of APPENDs
        self.penalty = penalty
        self.commands = {k.upper().encode(): v for k, v in (commands or {}).items()}
        self.seen: dict[bytes, int] = {}
        self._refusals: deque[float] = deque()
        self._penalized_until = 0.0
        self.events: list[tuple[float, str, int]] = []
        self.appends = 0  # APPEND commands seen
        self.open = 0
        self._lock = threading.Lock()
        self._listener = LoopServer(self._client, "proxy")
        self.port = self._listener.port

    # -- observations ---------------------------------------------------------------------
    def note(self, kind: str, value: int = 0) -> None:
        with self._lock:
            now = time.monotonic()
            self.events.append((now, kind, value))
            if kind == "append":
                self._recent.append((now, value))

    def _refused(self) -> None:
        if self.penalty is None:
            return
        with self._lock:
            now = time.monotonic()
            self._refusals.append(now)
            while self._refusals and self._refusals[0] < now - 10.0:
                self._refusals.popleft()
            if len(self._refusals) >= self.penalty[0]:
                self._penalized_until = now + self.penalty[1]
                self._refusals.clear()
                self.events.append((now, "penalty", 0))

    def _penalized(self) -> bool:
        return time.monotonic() < self._penalized_until

    def _too_fast(self) -> bool:
        if self.max_rate is None:
            return False
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - 1.0:
                self._recent.popleft()
            return sum(n for _, n in self._recent) >= self.max_rate

    def first(self, kind: str) -> float | None:
        with self._lock:
            return next((t for t, k, _ in self.events if k == kind), None)

    def peak_connections(self, start: float = 0.0, end: float = float("inf")) -> int:
        """Most connections open at once between `start` and `end`."""
        with self._lock:
            events = list(self.events)
        now = peak = 0
        for t, kind, _ in events:
            if kind == "open":
                now += 1
            elif kind == "close":
                now -= 1
            if start <= t <= end:
                peak = max(peak, now)
        return peak

    def appended(self, start: float | None = None, end: float | None = None) -> tuple[int, float]:
        """Messages forwarded in APPENDs between `start` (default: the first APPEND) and
        `end` (default: the last), and the seconds between those two instants."""
        with self._lock:
            times = [(t, n) for t, k, n in self.events if k == "append"]
        if not times:
            return 0, 0.0
        start = times[0][0] if start is None else start
        end = times[-1][0] if end is None else end
        return sum(n for t, n in times if start <= t <= end), max(end - start, 0.0)

    # -- the relay --------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.open += 1
        self.note("open", self.open)
        lock = asyncio.Lock()  # one whole response or injected line at a time
        down = asyncio.create_task(self._down(up_r, writer, lock))
        try:
            await self._up(reader, up_w, writer, lock)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            down.cancel()
            for w in (writer, up_w):
                with contextlib.suppress(Exception):
                    w.close()
            self.open -= 1
            self.note("close", self.open)

    async def _down(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    lock: asyncio.Lock) -> None:
        """Server -> client, one whole response (line and literals) at a time."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            while True:
                parts = [await up.readuntil(b"\r\n")]
                while match := _LITERAL.search(parts[-1]):
                    parts.append(await up.readexactly(int(match.group(1))))
                    parts.append(await up.readuntil(b"\r\n"))
                async with lock:
                    writer.write(b"".join(parts))
                    await writer.drain()
        writer.close()

    async def _up(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter,
                  writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        """Client -> server, command by command, deciding at each command's first line."""
        while True:
            line = await reader.readuntil(b"\r\n")
            tag, _, rest = line.partition(b" ")
            verb = rest.split(b" ", 1)[0].upper().strip()
            action = "forward"
            if verb == b"APPEND":
                with self._lock:
                    self.appends += 1
                    number = self.appends
                action = "refuse" if number in self.refuse or self._penalized() \
                    or self._too_fast() else \
                    "bye" if number in self.bye else "forward"
            elif any(rest.upper().startswith(k + b" ") for k in self.commands):
                key = next(k for k in self.commands if rest.upper().startswith(k + b" "))
                with self._lock:
                    self.seen[key] = number = self.seen.get(key, 0) + 1
                if number in self.commands[key]:
                    action = "unavailable"
            elif verb in (b"LOGIN", b"AUTHENTICATE") and (self._penalized() or (
                    self.limit is not None and self.appends >= self.limit_after
                    and self.open > self.limit)):
                action = "limit"
            if action == "bye":
                self.note("bye")
                async with lock:
                    writer.write(BYE)
                    await writer.drain()
                return
            messages = 0
            while True:  # the command's line, then each literal and the line after it
                match = _LITERAL.search(line)
                if action == "forward":
                    up.write(line)
                if match is None:
                    break
                size, plus = int(match.group(1)), match.group(2)
                if action != "forward" and not plus:
                    async with lock:  # a synchronizing literal we answer ourselves
                        writer.write(b"+ go ahead\r\n")
                        await writer.drain()
                remaining = size
                while remaining:
                    chunk = await reader.read(min(remaining, 1 << 16))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    remaining -= len(chunk)
                    if action == "forward":
                        up.write(chunk)
                        await up.drain()
                messages += 1
                line = await reader.readuntil(b"\r\n")
            await up.drain()
            if action == "forward" and verb == b"APPEND":
                self.note("append", messages)
            elif action in ("refuse", "limit", "unavailable"):
                self.note(action)
                self._refused()
                answer = {"refuse": THROTTLED, "limit": LIMIT}.get(action, UNAVAILABLE)
                async with lock:
                    writer.write(tag + b" " + answer + b"\r\n")
                    await writer.drain()

    def close(self) -> None:
        """Stop listening and stop the loop (open relays die with the thread's loop)."""
        self._listener.close()
