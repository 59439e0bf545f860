"""A scripted SMTP/LMTP server on 127.0.0.1, in the test's own event loop.

Where a real Postfix or Dovecot cannot be made to misbehave on cue (a link that breaks
between two LMTP per-recipient replies, a server that greets and then says nothing), a
test plays the server side itself. Two ways:

- ``ScriptedServer(session)``: `session` is the test's own coroutine, written like a
  dialogue on a ``Peer`` (``await peer.hear()`` one command, ``await peer.say(...)`` the
  reply lines, ``peer.drop()`` the connection). An assertion failing inside it is raised
  again when the server's ``async with`` block ends, so a script that did not go as
  written fails the test.
- ``Sink``: a small, well-behaved SMTP or LMTP server whose answers per recipient come
  from a table, that records what it was given (for the delivery scheduler's tests).

Both count sessions, and the most that were open at once (per-destination concurrency).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

OK = "250 2.0.0 Ok"


class Peer:
    """The server's end of one session."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def hear(self) -> str:
        """The next command line, without CRLF; EOFError once the client has gone."""
        line = await self.reader.readline()
        if not line:
            raise EOFError("the client closed the connection")
        return line.decode().rstrip("\r\n")

    def pending(self) -> bytes:
        """What the client has sent that the server has not read yet (pipelining)."""
        return bytes(self.reader._buffer)  # type: ignore[attr-defined]

    async def say(self, *lines: str) -> None:
        """Reply lines, written in one go (``250-a``, ``250 b`` make one reply)."""
        self.writer.write(b"".join(line.encode() + b"\r\n" for line in lines))
        await self.writer.drain()

    async def message(self) -> bytes:
        """The DATA section up to the lone dot, dot-stuffing undone."""
        lines = []
        while (line := await self.reader.readline()) not in (b".\r\n", b""):
            lines.append(line[1:] if line.startswith(b"..") else line)
        return b"".join(lines)

    async def gone(self) -> None:
        """Wait, saying nothing, until the client closes the connection (a hang)."""
        while await self.reader.read(4096):
            pass

    def drop(self) -> None:
        """Break the connection (no QUIT, no reply)."""
        self.writer.transport.abort()


Session = Callable[[Peer], Awaitable[None]]


class ScriptedServer:
    """Serve every connection with `session`; ``async with`` starts and stops it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.port = 0
        self.sessions = 0
        self.active = 0
        self.most_active = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if kind is None and self.errors:
            raise self.errors[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await self.session(Peer(reader, writer))
        except (EOFError, ConnectionError):
            pass  # the client left: its side of the test says whether that was right
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the script's own assertion: fail the test
            self.errors.append(exc)
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.close()


@dataclass
class Sink:
    """A mail system on loopback: answers each recipient from a table, records the rest.

    `at_rcpt[rcpt]` and (LMTP) `after_data[rcpt]` are replies used up one per attempt,
    then ``250``. With `gate` set, final replies wait until it is opened (a slow system).
    """

    lmtp: bool = True
    pipelining: bool = True
    at_rcpt: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    after_data: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    gate: asyncio.Event | None = None
    rcpts: Counter[str] = field(default_factory=Counter)  # RCPT commands per address
    delivered: list[tuple[str, str]] = field(default_factory=list)  # (rcpt, Message-ID)
    messages: dict[str, bytes] = field(default_factory=dict)  # Message-ID -> the message
    waiting: int = 0  # transactions waiting at the gate
    server: ScriptedServer | None = None

    def script(self, rcpt: str, *replies: str, after_data: bool = False) -> None:
        """The next replies for `rcpt` (then 250 again)."""
        (self.after_data if after_data else self.at_rcpt)[rcpt].extend(replies)

    def got(self, rcpt: str) -> list[str]:
        """Message-IDs `rcpt` has been given, in order."""
        return [mid for r, mid in self.delivered if r == rcpt]

    async def __aenter__(self) -> Sink:
        self.server = await ScriptedServer(self._session).__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        if self.gate is not None:
            self.gate.set()
        await self.server.__aexit__(None, None, None)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def _session(self, peer: Peer) -> None:
        await peer.say("220 sink ready")
        accepted: list[str] = []
        while True:
            command = await peer.hear()
            verb = command[:4].upper()
            if verb in ("LHLO", "EHLO"):
                await peer.say("250-sink", *(["250-PIPELINING"] if self.pipelining else []),
                               "250 8BITMIME")
            elif verb == "MAIL":
                accepted = []
                await peer.say(OK)
            elif verb == "RCPT":
                rcpt = command.split("<", 1)[1].split(">", 1)[0]
                self.rcpts[rcpt] += 1
                queued = self.at_rcpt.get(rcpt)
                reply = queued.popleft() if queued else OK
                if reply.startswith("2"):
                    accepted.append(rcpt)
                await peer.say(reply)
            elif verb == "DATA":
                await self._data(peer, accepted)
                accepted = []
            elif verb == "RSET":
                accepted = []
                await peer.say(OK)
            elif verb == "QUIT":
                await peer.say("221 bye")
                return
            else:
                await peer.say("502 5.5.2 unknown command")

    async def _data(self, peer: Peer, accepted: list[str]) -> None:
        if not accepted:
            await peer.say("503 5.5.1 no valid recipients")
            return
        await peer.say("354 go ahead")
        message = await peer.message()
        message_id = str(email.message_from_bytes(message)["Message-ID"])
        self.messages[message_id] = message
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        finals = []
        for rcpt in accepted if self.lmtp else accepted[:1]:
            queued = self.after_data.get(rcpt) if self.lmtp else None
            finals.append(queued.popleft() if queued else OK)
        for rcpt, reply in zip(accepted if self.lmtp else [], finals, strict=False):
            if reply.startswith("2"):
                self.delivered.append((rcpt, message_id))
        if not self.lmtp:
            self.delivered += [(rcpt, message_id) for rcpt in accepted]
        await peer.say(*finals)


async def until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Wait (in the loop, never blocking it) until `condition()` is true."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.001)
            return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
