"""The shared HTTP client (`mailferry.mail.http`) against a real aiohttp server on 127.0.0.1:
one kept-alive connection, a timeout per route, three distinct transport errors, and a
connection the server closed while idle replaced before anything is sent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from mailferry.mail.http import (
    BadHeader,
    CannotConnect,
    ClosedMidRequest,
    HttpClient,
    NoAnswerYet,
    _closed_by_peer,
)

from helpers.waiting import wait_for
from sysutil import free_port

pytestmark = pytest.mark.timeout(60)


@dataclass
class Server:
    """An aiohttp application in its own thread and loop; `peers` records, per request, the
    client's (host, port): which TCP connection carried it."""

    port: int
    keepalive: float = 75.0
    peers: list[tuple[str, int]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        async def echo(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.peers.append((peer[0], peer[1]) if peer else ("", 0))
            body = await request.read()
            return web.json_response({"method": request.method, "path": request.path_qs,
                                      "body": body.decode(),
                                      "auth": request.headers.get("Authorization", "")})

        async def slow(request: web.Request) -> web.Response:
            # Answers once the test lets it (bounded: 20 s at most).
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 20)
            return web.json_response({"late": True})

        async def hang_up(request: web.Request) -> web.Response:
            assert request.transport is not None
            request.transport.abort()  # no status line at all
            return web.Response()

        app = web.Application()
        app.router.add_route("*", "/echo", echo)
        app.router.add_get("/slow", slow)
        app.router.add_post("/hang-up", hang_up)
        return app

    def start(self) -> Server:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._runner = web.AppRunner(self._app(), keepalive_timeout=self.keepalive)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "aiohttp server did not start"
        return self

    def stop(self) -> None:
        self.release.set()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(free_port()).start()
    yield s
    s.stop()


def test_calls_share_one_kept_alive_connection(server: Server) -> None:
    client = HttpClient(server.url, name="echo", headers={"Authorization": "Bearer t"})
    answers = [client.request("GET", f"/echo?n={n}") for n in range(5)]
    answers.append(client.request("POST", "/echo", b"payload"))
    assert [a.status for a in answers] == [200] * 6
    assert answers[2].json()["path"] == "/echo?n=2"
    assert answers[-1].json() == {"method": "POST", "path": "/echo", "body": "payload",
                                  "auth": "Bearer t"}
    assert len(set(server.peers)) == 1, server.peers  # six requests, one TCP connection
    assert client.local_address() == server.peers[0]
    client.close()
    client.request("GET", "/echo")
    assert len(set(server.peers)) == 2  # closed: the next call opened a new one


def test_each_thread_has_its_own_connection(server: Server) -> None:
    client = HttpClient(server.url)
    client.request("GET", "/echo")
    other = threading.Thread(target=lambda: client.request("GET", "/echo"))
    other.start()
    other.join(10)
    assert len(server.peers) == 2 and server.peers[0] != server.peers[1]


def test_a_route_waits_as_long_as_its_own_timeout(server: Server) -> None:
    client = HttpClient(server.url, name="echo", timeout=5.0,
                        timeouts={("GET", "/slow"): 0.3})
    assert client.timeout_for("GET", "/slow?x=1") == 0.3
    assert client.timeout_for("GET", "/echo") == 5.0
    with pytest.raises(NoAnswerYet) as caught:
        client.request("GET", "/slow")
    assert str(caught.value) == f"no answer yet from echo to GET {server.url}/slow after 0.3 s"
    assert caught.value.after == 0.3
    # The timed-out connection is dropped; other routes keep the default and work.
    assert client.request("GET", "/echo").status == 200
    # A longer timeout for the same route gets the answer.
    threading.Timer(0.5, server.release.set).start()
    assert client.request("GET", "/slow", timeout=10.0).json() == {"late": True}


def test_cannot_connect_is_told_apart(server: Server) -> None:
    port = free_port()
    client = HttpClient(f"http://127.0.0.1:{port}", name="fed")
    with pytest.raises(CannotConnect) as caught:
        client.request("GET", "/v1/queue")
    assert str(caught.value) == (f"cannot connect to fed at http://127.0.0.1:{port} (GET "
                                 f"http://127.0.0.1:{port}/v1/queue): Connection refused")
    with pytest.raises(CannotConnect, match="not an http"):
        HttpClient("ftp://127.0.0.1/").request("GET", "/x")


def test_a_connection_broken_mid_request_is_told_apart(server: Server) -> None:
    client = HttpClient(server.url, name="echo")
    with pytest.raises(ClosedMidRequest) as caught:
        client.request("POST", "/hang-up", b"x")
    assert str(caught.value).startswith(
        f"echo closed the connection during POST {server.url}/hang-up: "), caught.value
    assert client.request("GET", "/echo").status == 200  # and the client recovers


def test_a_connection_closed_while_idle_is_replaced_before_sending() -> None:
    server = Server(free_port(), keepalive=0.2).start()
    try:
        client = HttpClient(server.url)
        client.request("GET", "/echo")
        first = client.local_address()
        conn = client._conns()[("http", "127.0.0.1", server.port)]
        assert conn.sock is not None
        wait_for(lambda: _closed_by_peer(conn.sock), 10, "the server's keep-alive close")
        # A POST is not retried after a failure; it must not be sent on the dead socket.
        assert client.request("POST", "/echo", b"once").json()["body"] == "once"
        assert client.local_address() != first
        assert len(server.peers) == 2
    finally:
        server.stop()


def test_a_header_that_cannot_be_sent_is_not_echoed(server: Server) -> None:
    client = HttpClient(server.url)
    with pytest.raises(BadHeader) as caught:
        client.request("GET", "/echo", headers={"Authorization": "Bearer s3cr3t\nX: 1"})
    assert "s3cr3t" not in str(caught.value), caught.value
    assert str(caught.value).startswith(f"cannot send GET {server.url}/echo")
