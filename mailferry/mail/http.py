"""One HTTP client for mailferry's own calls: connections kept alive, a timeout per route.

Who calls it: the reconciler's client of fed's control API (``reconciler/fedclient.py``),
``fed queue`` across nodes (``fed/queuectl.py``), the station agent's client of the station
API (``station_agent/client.py``) and the mover's WebDAV client (``reconciler/mover/dav.py``).
All four are synchronous code: the engine's steps, a CLI, the agent's poll loop, the
mover's calendar thread.

Why blocking ``http.client`` and not aiohttp. aiohttp is the servers' library here (fed's
control API, the station API), but a client session of aiohttp belongs to one running event
loop: a blocking facade over it needs a loop thread per client, a hand-off per call and
care at shutdown and after ``fork``, which is more moving parts than the whole client
below, for callers that wait for the answer anyway. ``http.client`` gives what matters
directly: one kept-alive connection per thread and origin (a call no longer pays a TCP
handshake, measured in ``bench/fedclient_reuse.py``), a connect timeout apart from the
answer's, and a timeout per route (``timeouts``: a hold waits for deliveries in flight, a
directory carries every mailbox). The station agent, installed on workstations, keeps a
dependency-free client. The tests run it against a real aiohttp server on 127.0.0.1.

Errors say which of three things happened, because a person acts differently:

- ``CannotConnect``: nothing listens, the name does not resolve, TLS was refused (the
  server is down or the URL is wrong);
- ``NoAnswerYet``: the server took the request and has not answered within the route's
  timeout (it may still be working on it: retry later, this is not an outage);
- ``ClosedMidRequest``: the connection broke during the request (the server died or
  restarted). A kept-alive connection the server closed while idle is seen before the
  request is sent (the socket reads EOF) and replaced; one that breaks as the request goes
  out is re-opened once and the request sent again, for idempotent methods
  (``retry_idle="all"``: the caller's API is idempotent throughout, as fed's is).

An HTTP status is not an error here: the answer is returned and the caller decides what
401 or 409 means. A header value ``http.client`` refuses (a token holding a newline) raises
``BadHeader`` without the value: it would echo a secret.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PROPFIND", "REPORT"})


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


Origin = tuple[str, str, int]  # scheme, host, port


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when an idle kept-alive socket is readable: the server closed it (EOF) or sent
    something unasked; either way it cannot carry the next request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class HttpClient:
    """Blocking HTTP/1.1 to one base URL (and any origin an absolute URL names), one
    kept-alive connection per thread and origin. Thread-safe: threads never share one."""

    def __init__(self, base_url: str, *, name: str = "", timeout: float = DEFAULT_TIMEOUT,
                 timeouts: Mapping[tuple[str, str], float] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 headers: Mapping[str, str] | None = None,
                 context: ssl.SSLContext | None = None,
                 retry_idle: Literal["idempotent", "all"] = "idempotent") -> None:
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        self.name = name or self.base_url  # how messages call the server ("fed")
        self.timeout = timeout  # routes without an entry in `timeouts`
        self.timeouts = dict(timeouts or {})
        self.connect_timeout = min(connect_timeout, timeout)
        self.headers = dict(headers or {})
        self.context = context
        self.retry_idle = retry_idle
        self._prefix = parts.path
        self._local = threading.local()  # .conns: origin -> this thread's connection

    # -- connections ------------------------------------------------------------------
    def timeout_for(self, method: str, path: str) -> float:
        """Seconds to wait for the answer to `method path` (its query string ignored)."""
        return self.timeouts.get((method, path.partition("?")[0]), self.timeout)

    def _conns(self) -> dict[Origin, http.client.HTTPConnection]:
        conns: dict[Origin, http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def close(self) -> None:
        """Close this thread's connections (the next call opens new ones)."""
        conns = self._conns()
        for conn in conns.values():
            conn.close()
        conns.clear()

    def local_address(self) -> tuple[str, int] | None:
        """The local (host, port) of this thread's kept-alive connection to the base URL, or
        None: which TCP connection carries the calls (tests, diagnostics)."""
        conn = self._conns().get(self._origin(self.base_url)[0])
        if conn is None or conn.sock is None:
            return None
        host, port = conn.sock.getsockname()[:2]
        return str(host), int(port)

    def _origin(self, url: str) -> tuple[Origin, str]:
        """(origin, path with query) of an absolute URL."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return (scheme, parts.hostname or "", port), target

    def _connection(self, origin: Origin, method: str,
                    url: str) -> tuple[http.client.HTTPConnection, bool]:
        """(this thread's connection to `origin`, True when kept alive from an earlier call)."""
        conns = self._conns()
        conn = conns.get(origin)
        if conn is not None and conn.sock is not None:
            if not _closed_by_peer(conn.sock):
                return conn, True
            conn.close()  # closed while idle: a new one, before anything is sent
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout,
                context=self.context or ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            why = "timed out" if isinstance(exc, TimeoutError) else getattr(exc, "strerror",
                                                                             None) or exc
            raise CannotConnect(f"cannot connect to {self.name} at {self.base_url} "
                                f"({method} {url}): {why}", method, url) from exc
        conns[origin] = conn
        return conn, False

    def _drop(self, origin: Origin) -> None:
        conn = self._conns().pop(origin, None)
        if conn is not None:
            conn.close()

    # -- requests ---------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, *,
                headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Response:
        """Send `method` to `path` (below the base URL) or to an absolute http(s) URL; the
        answer whatever its status. `timeout` overrides the route's."""
        absolute = path.startswith(("http://", "https://"))
        url = path if absolute else self.base_url + path
        origin, target = self._origin(url)
        if origin[0] not in ("http", "https") or not origin[1]:
            raise CannotConnect(f"cannot connect to {self.name} at {self.base_url} ({method} "
                                f"{url}): not an http(s)://HOST[:PORT] URL", method, url)
        route = urllib.parse.urlsplit(url).path if absolute else path
        wait = timeout if timeout is not None else self.timeout_for(method, route)
        sent = {**self.headers, **(headers or {})}
        retry = self.retry_idle == "all" or method in IDEMPOTENT
        for attempt in (1, 2):
            conn, reused = self._connection(origin, method, url)
            try:
                conn.request(method, target, body=body, headers=sent)
                if conn.sock is not None:
                    conn.sock.settimeout(wait)
                answer = conn.getresponse()
                raw = answer.read()
            except ValueError:  # http.client refuses the header: it would echo its value
                self._drop(origin)
                raise BadHeader(f"cannot send {method} {url}: a header value is not a valid "
                                "HTTP header value", method, url) from None
            except TimeoutError as exc:
                self._drop(origin)
                raise NoAnswerYet(f"no answer yet from {self.name} to {method} {url} after "
                                  f"{wait:g} s", method, url, wait) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop(origin)
                if reused and attempt == 1 and retry:
                    continue  # the server closed the idle kept-alive connection: once more
                raise ClosedMidRequest(f"{self.name} closed the connection during {method} "
                                       f"{url}: {exc or type(exc).__name__}", method,
                                       url) from exc
            if answer.will_close:
                self._drop(origin)
            return Response(answer.status, answer.reason, raw, dict(answer.getheaders()))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
