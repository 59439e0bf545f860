"""One HTTP client for mailferry's own calls, on aiohttp: connections kept alive, a timeout
per route, transport errors worded apart.

Who calls it: the reconciler's client of fed's control API (``reconciler/fedclient.py``),
``fed queue`` across nodes (``fed/admin/queuectl.py``), the station agent's client of the
station API (``station_agent/client.py``) and the mover's WebDAV client
(``reconciler/mover/dav.py``). All four are synchronous code (the engine's steps, a CLI, the
agent's poll loop, the mover's calendar thread) and use the blocking `HttpClient`; code
that runs in an event loop uses `AsyncHttpClient` directly (fed's own asyncio code makes no
HTTP calls today).

Why aiohttp. It is already the library of every HTTP server here (fed's control API, the
station API, the status page), so client and servers share one HTTP implementation, one
parser and one set of bugs, and the client gets what a hand-made one on ``http.client`` had
to write itself: a connection pool shared by all threads (a kept-alive connection per
origin and concurrent call, instead of one per thread, idle ones noticed closed before
anything is sent on them), a connect timeout apart from the answer's, TLS through an
``ssl`` context. The station agent depends on aiohttp like the rest of the package.

How the blocking facade works. `AsyncHttpClient` holds one ``aiohttp.ClientSession`` over
one ``TCPConnector`` (the pool), created on the first call inside the loop that runs it.
`HttpClient` owns one `LoopThread` (``mailferry/mail/loopthread.py``): a private event loop
in a daemon thread, started by the first call, and hands each call to it as one
coroutine; any number of threads may call at once (the pool gives each call in flight its
own connection). ``close()`` closes the session and ends the thread (the next call starts
both again); a client nobody closed is closed when it is garbage-collected or at
interpreter exit (``weakref.finalize``). After ``fork`` the child never touches the
parent's loop, session or sockets (the pid differs): its first call starts a loop and a
session of its own.

Errors say which of three things happened, because a person acts differently:

- ``CannotConnect``: nothing listens, the name does not resolve, the connect timed out, TLS
  was refused (the server is down or the URL is wrong);
- ``NoAnswerYet``: the server took the request and has not answered within the route's
  timeout (it may still be working on it: retry later, this is not an outage);
- ``ClosedMidRequest``: the connection broke during the request (the server died or
  restarted). A kept-alive connection that breaks as the request goes out (the server
  closed it at that moment) is replaced and the request sent once more, for idempotent
  methods (``retry_idle="all"``: the caller's API is idempotent throughout, as fed's is);
  a connection opened for this call is not retried, nor is one that broke mid-answer.

An HTTP status is not an error here: the answer is returned (redirects too, they are not
followed) and the caller decides what 401 or 409 means. A header value that cannot be sent
(a token holding a newline) raises ``BadHeader`` without the value: it would echo a secret.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import ssl
import threading
import urllib.parse
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal, TypedDict, Unpack

import aiohttp
from yarl import URL

from mailferry.mail.loopthread import LoopThread

DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# How long an idle pooled connection is kept. aiohttp's servers (fed, the station API) close
# idle ones after 75 s: closing first, the client never sends on one the server is closing.
KEEPALIVE = 60.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PROPFIND", "REPORT"})
_UNSENDABLE = frozenset("\r\n\0")


class HttpError(Exception):
    """A request that got no HTTP answer (the message names the URL and what happened)."""

    def __init__(self, message: str, method: str, url: str) -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class CannotConnect(HttpError):
    """No connection could be opened (refused, unresolvable, timed out, TLS refused)."""


class NoAnswerYet(HttpError):
    """The request was sent and no answer came within the route's timeout."""

    def __init__(self, message: str, method: str, url: str, after: float) -> None:
        super().__init__(message, method, url)
        self.after = after


class ClosedMidRequest(HttpError):
    """The connection broke while the request was sent or its answer read."""


class BadHeader(HttpError):
    """A header value cannot be sent (the value is not in the message: it may be secret)."""


@dataclass(frozen=True)
class Response:
    """One HTTP answer, read whole."""

    status: int
    reason: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body decoded as JSON (``null`` when empty); ValueError when it is not JSON."""
        return json.loads(self.body or b"null")


async def _on_reuse(session: aiohttp.ClientSession, trace: SimpleNamespace,
                    params: aiohttp.TraceConnectionReuseconnParams) -> None:
    """aiohttp's trace hook: this call is carried by a pooled, kept-alive connection."""
    if isinstance(trace.trace_request_ctx, SimpleNamespace):
        trace.trace_request_ctx.reused = True


class _Connector(aiohttp.TCPConnector):
    """The pool, noting per origin the connection that carried its latest call (aiohttp
    lets go of it as soon as a short answer is read)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last: dict[URL, tuple[Any, tuple[str, int]]] = {}

    async def connect(self, req: Any, *args: Any, **kwargs: Any) -> Any:
        connection = await super().connect(req, *args, **kwargs)
        transport = connection.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        if local:
            self.last[req.url.origin()] = (connection.protocol, (str(local[0]), int(local[1])))
        return connection


class AsyncHttpClient:
    """HTTP/1.1 to one base URL (and any origin an absolute URL names) over one pool of
    kept-alive connections, for code running in an event loop: the session belongs to the
    loop of the first call (until `close`)."""

    def __init__(self, base_url: str, *, name: str = "", timeout: float = DEFAULT_TIMEOUT,
                 timeouts: Mapping[tuple[str, str], float] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 headers: Mapping[str, str] | None = None,
                 context: ssl.SSLContext | None = None, cafile: str | None = None,
                 retry_idle: Literal["idempotent", "all"] = "idempotent") -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url  # how messages call the server ("fed")
        self.timeout = timeout  # routes without an entry in `timeouts`
        self.timeouts = dict(timeouts or {})
        self.connect_timeout = min(connect_timeout, timeout)
        self.headers = dict(headers or {})
        self.context = context
        self.cafile = cafile  # a CA file to verify https servers with, else the system's
        self.retry_idle = retry_idle
        self._session: aiohttp.ClientSession | None = None
        self._pool: _Connector | None = None

    def timeout_for(self, method: str, path: str) -> float:
        """Seconds to wait for the answer to `method path` (its query string ignored)."""
        return self.timeouts.get((method, path.partition("?")[0]), self.timeout)

    # -- the session ----------------------------------------------------------------------
    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            tls: ssl.SSLContext | bool = self.context or True
            if self.context is None and self.cafile is not None:
                tls = ssl.create_default_context(cafile=self.cafile)
            tracing = aiohttp.TraceConfig()
            tracing.on_connection_reuseconn.append(_on_reuse)
            self._pool = _Connector(ssl=tls, keepalive_timeout=KEEPALIVE)
            self._session = aiohttp.ClientSession(
                connector=self._pool,
                # No cookies, no proxy from the environment, no Content-Type guessed for a
                # body: the calls go as the caller wrote them.
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                skip_auto_headers=("Content-Type",), trace_configs=[tracing])
            # aiohttp retries some idempotent methods once by itself, on any connection;
            # the retry below is the one rule (a kept-alive connection only, the caller's
            # idea of idempotent), so aiohttp's is off. tests/test_mail_http.py pins it.
            self._session._retry_connection = False
        return self._session

    async def close(self) -> None:
        """Close the pool's connections (the next call opens a new session)."""
        session, self._session, self._pool = self._session, None, None
        if session is not None:
            await session.close()

    def abandon(self) -> None:
        """Forget a session inherited through fork without any I/O: its sockets and loop
        are the parent's. Marked closed so that its finalizers do not try to close them
        (aiohttp's connector would unregister them from the epoll the parent shares)."""
        session, self._session, self._pool = self._session, None, None
        if session is not None:
            connector = session.connector
            session.detach()
            if connector is not None:
                connector._closed = True

    def local_address(self) -> tuple[str, int] | None:
        """The local (host, port) of the kept-alive connection that carried the latest call
        to the base URL while it is open, else None: which TCP connection carries the calls
        (tests, diagnostics)."""
        last = self._pool.last.get(URL(self.base_url).origin()) if self._pool else None
        if last is None or not last[0].is_connected():
            return None
        return last[1]

    # -- requests ---------------------------------------------------------------------
    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> Response:
        """Send `method` to `path` (below the base URL) or to an absolute http(s) URL; the
        answer whatever its status. `timeout` overrides the route's."""
        absolute = path.startswith(("http://", "https://"))
        url = path if absolute else self.base_url + path
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CannotConnect(f"cannot connect to {self.name} at {self.base_url} ({method} "
                                f"{url}): not an http(s)://HOST[:PORT] URL", method, url)
        sent = {**self.headers, **(headers or {})}
        if any(_UNSENDABLE.intersection(k + v) for k, v in sent.items()):
            raise BadHeader(f"cannot send {method} {url}: a header value is not a valid HTTP "
                            "header value", method, url)
        wait = timeout if timeout is not None else self.timeout_for(
            method, parts.path if absolute else path)
        limits = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                       sock_connect=self.connect_timeout, sock_read=wait)
        retry = self.retry_idle == "all" or method in IDEMPOTENT
        for attempt in (1, 2):
            trace = SimpleNamespace(reused=False)
            try:
                return await self._send(method, url, body, sent, limits, trace)
            except ClosedMidRequest as exc:
                if not (retry and attempt == 1 and trace.reused and isinstance(
                        exc.__cause__, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)):
                    raise
                # the kept-alive connection broke as the request went out: once more
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                    limits: aiohttp.ClientTimeout, trace: SimpleNamespace) -> Response:
        """One attempt; aiohttp's errors as the three kinds (module docstring)."""
        try:
            async with self._open().request(
                    method, URL(url, encoded=True), data=body, headers=headers,
                    timeout=limits, allow_redirects=False, trace_request_ctx=trace) as answer:
                raw = await answer.read()
                return Response(answer.status, answer.reason or "", raw, dict(answer.headers))
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._cannot_connect(method, url, "timed out") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            failed = exc.certificate_error
            why = getattr(failed, "verify_message", "") or str(failed)
            raise self._cannot_connect(method, url, f"TLS refused: certificate verify failed "
                                                    f"({why})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._cannot_connect(method, url, _why(exc.os_error)) from exc
        except TimeoutError as exc:  # aiohttp's SocketTimeoutError (sock_read) among them
            wait = limits.sock_read or 0.0
            raise NoAnswerYet(f"no answer yet from {self.name} to {method} {url} after "
                              f"{wait:g} s", method, url, wait) from exc
        except aiohttp.ClientError as exc:  # disconnected, reset, a malformed answer, ...
            raise ClosedMidRequest(f"{self.name} closed the connection during {method} {url}: "
                                   f"{exc or type(exc).__name__}", method, url) from exc

    def _cannot_connect(self, method: str, url: str, why: str) -> CannotConnect:
        return CannotConnect(f"cannot connect to {self.name} at {self.base_url} "
                             f"({method} {url}): {why}", method, url)


def _why(error: OSError) -> str:
    """What an OSError of connecting says to a person: asyncio words a refusal "Connect call
    failed ('127.0.0.1', 8080)", the errno says why."""
    if isinstance(error, ssl.SSLError):
        return f"TLS refused: {error.reason or error}"
    return os.strerror(error.errno) if error.errno else str(error)


class _Runner:
    """What a blocking client runs on: its loop thread (None until the first call and after
    close). Apart from `HttpClient` so that its finalizer holds no reference to the client."""

    def __init__(self, client: AsyncHttpClient) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.thread: LoopThread | None = None

    def loop(self) -> LoopThread:
        with self.lock:
            if self.thread is not None and not self.thread.owned:
                self.client.abandon()  # forked: the parent's loop and sockets stay untouched
                self.thread = None
            if self.thread is None:
                self.thread = LoopThread(f"http {self.client.name}")
            return self.thread

    def stop(self) -> None:
        with self.lock:
            thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop(self.client.close)


class Options(TypedDict, total=False):
    """`AsyncHttpClient`'s keyword arguments, which `HttpClient` takes as they are."""

    name: str
    timeout: float
    timeouts: Mapping[tuple[str, str], float] | None
    connect_timeout: float
    headers: Mapping[str, str] | None
    context: ssl.SSLContext | None
    cafile: str | None
    retry_idle: Literal["idempotent", "all"]


class HttpClient:
    """The blocking facade over `AsyncHttpClient` (module docstring): the same arguments,
    the same `request`, from any number of threads."""

    def __init__(self, base_url: str, **options: Unpack[Options]) -> None:
        self.client = AsyncHttpClient(base_url, **options)
        self._runner = _Runner(self.client)
        weakref.finalize(self, self._runner.stop)  # also at interpreter exit

    @property
    def base_url(self) -> str:
        return self.client.base_url

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def timeout(self) -> float:
        return self.client.timeout

    @property
    def timeouts(self) -> dict[tuple[str, str], float]:
        return self.client.timeouts

    def timeout_for(self, method: str, path: str) -> float:
        """Seconds to wait for the answer to `method path` (its query string ignored)."""
        return self.client.timeout_for(method, path)

    def request(self, method: str, path: str, body: bytes | None = None, *,
                headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Response:
        """`AsyncHttpClient.request`, run on the client's loop thread."""
        try:
            return self._runner.loop().run(self.client.request(
                method, path, body, headers=headers, timeout=timeout))
        except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
            url = path if path.startswith(("http://", "https://")) else self.base_url + path
            raise ClosedMidRequest(f"{self.name}: the client was closed during {method} "
                                   f"{url}", method, url) from exc

    def close(self) -> None:
        """Close the connections and end the loop's thread (the next call starts both
        again). A call another thread has in flight is cancelled (ClosedMidRequest)."""
        self._runner.stop()

    def local_address(self) -> tuple[str, int] | None:
        """`AsyncHttpClient.local_address`, read on the loop (None before the first call)."""
        thread = self._runner.thread
        if thread is None or not thread.alive:
            return None

        async def read() -> tuple[str, int] | None:
            return self.client.local_address()

        return thread.run(read())

    @property
    def loop_thread(self) -> threading.Thread | None:
        """The thread running this client's loop, None when none runs (tests)."""
        thread = self._runner.thread
        return thread.thread if thread is not None and thread.alive else None
