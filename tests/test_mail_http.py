"""The shared HTTP client (`mailferry.mail.http`, on aiohttp) against a real aiohttp server on
127.0.0.1: kept-alive connections counted by the server's accepts, a timeout per route, three
distinct transport errors, the one retry, a server killed and restarted under the client,
TLS with a CA file, the loop thread's life (close, fork, interpreter exit)."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mailferry.mail.http import (
    AsyncHttpClient,
    BadHeader,
    CannotConnect,
    ClosedMidRequest,
    HttpClient,
    NoAnswerYet,
)

from helpers.waiting import wait_for
from sysutil import free_port
from test_mover_tls import self_signed

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    """An aiohttp application in its own thread and loop. `accepted` counts the TCP
    connections it accepted; `peers` records, per request, the client's (host, port): which
    connection carried it; `hits` counts requests by path."""

    port: int
    keepalive: float = 75.0
    tls: ssl.SSLContext | None = None
    accepted: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)
    waiting: threading.Event = field(default_factory=threading.Event)  # /slow has a request
    release: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _protocols: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.accepted = 0
        self.peers.clear()
        self.hits.clear()
        self.waiting.clear()
        self.release.clear()

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
            self.waiting.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 20)
            return web.json_response({"late": True})

        async def hang_up(request: web.Request) -> web.Response:
            assert request.transport is not None
            request.transport.abort()  # no status line at all
            return web.Response()

        async def drop_once(request: web.Request) -> web.Response:
            # The first request on each connection is dropped unanswered: a kept-alive
            # connection that breaks as the request goes out.
            assert request.transport is not None
            if self.hits[request.path] % 2 == 1:
                request.transport.abort()
                return web.Response()
            return await echo(request)

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[count])
        app.router.add_route("*", "/echo", echo)
        app.router.add_route("*", "/slow", slow)
        app.router.add_route("*", "/hang-up", hang_up)
        app.router.add_route("*", "/drop-once", drop_once)
        return app

    def start(self) -> Server:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self._app(), keepalive_timeout=self.keepalive)
            loop.run_until_complete(runner.setup())
            handlers = runner.server
            assert handlers is not None

            def accept() -> Any:  # one call per accepted TCP connection
                self.accepted += 1
                protocol = handlers()
                self._protocols.append(protocol)
                return protocol

            listener = loop.run_until_complete(loop.create_server(
                accept, "127.0.0.1", self.port, ssl=self.tls))
            ready.set()
            loop.run_forever()
            listener.close()
            for protocol in self._protocols:  # as if killed: no goodbye on any connection
                if protocol.transport is not None:
                    protocol.transport.abort()
            self.release.set()  # /slow's waits end now: its connection is gone
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "aiohttp server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self.release.set()


@pytest.fixture(scope="module")
def shared() -> Iterator[Server]:
    s = Server(free_port()).start()
    yield s
    s.stop()


@pytest.fixture
def server(shared: Server) -> Server:
    shared.reset()
    return shared


@pytest.fixture
def closing() -> Iterator[list[HttpClient]]:
    """Clients to close after the test (their loop threads end with it)."""
    clients: list[HttpClient] = []
    yield clients
    for client in clients:
        client.close()


def test_calls_share_one_kept_alive_connection(server: Server,
                                               closing: list[HttpClient]) -> None:
    client = HttpClient(server.url, name="echo", headers={"Authorization": "Bearer t"})
    closing.append(client)
    answers = [client.request("GET", f"/echo?n={n}") for n in range(20)]
    answers.append(client.request("POST", "/echo", b"payload"))
    assert [a.status for a in answers] == [200] * 21
    assert answers[2].json()["path"] == "/echo?n=2"
    assert answers[-1].json() == {"method": "POST", "path": "/echo", "body": "payload",
                                  "auth": "Bearer t"}
    assert server.accepted == 1  # 21 requests, one TCP connection
    assert len(set(server.peers)) == 1, server.peers
    assert client.local_address() == server.peers[0]
    client.close()
    client.request("GET", "/echo")
    assert server.accepted == 2  # closed: the next call opened a new one
    assert len(set(server.peers)) == 2


def test_paths_go_as_written_and_redirects_are_answers(server: Server,
                                                       closing: list[HttpClient]) -> None:
    client = HttpClient(server.url)
    closing.append(client)
    assert client.request("GET", "/echo?a=%2F%20b").json()["path"] == "/echo?a=%2F%20b"
    assert client.request("GET", "/nowhere").status == 404


def test_threads_in_flight_at_once_get_a_connection_each(server: Server,
                                                         closing: list[HttpClient]) -> None:
    client = HttpClient(server.url)
    closing.append(client)
    client.request("GET", "/echo")
    late: list[Any] = []
    other = threading.Thread(target=lambda: late.append(client.request("GET", "/slow").json()))
    other.start()
    assert server.waiting.wait(10)
    # /slow holds the first connection: this call is not queued behind it.
    assert client.request("GET", "/echo").status == 200
    assert server.accepted == 2 and server.peers[0] != server.peers[1]
    server.release.set()
    other.join(10)
    assert late == [{"late": True}]
    client.request("GET", "/echo")
    assert server.accepted == 2  # both went back to the pool


def test_a_route_waits_as_long_as_its_own_timeout(server: Server,
                                                  closing: list[HttpClient]) -> None:
    client = HttpClient(server.url, name="echo", timeout=5.0,
                        timeouts={("GET", "/slow"): 0.3})
    closing.append(client)
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


def test_cannot_connect_is_told_apart(closing: list[HttpClient]) -> None:
    port = free_port()
    client = HttpClient(f"http://127.0.0.1:{port}", name="fed")
    closing.append(client)
    with pytest.raises(CannotConnect) as caught:
        client.request("GET", "/v1/queue")
    assert str(caught.value) == (f"cannot connect to fed at http://127.0.0.1:{port} (GET "
                                 f"http://127.0.0.1:{port}/v1/queue): Connection refused")
    with pytest.raises(CannotConnect, match="not an http"):
        HttpClient("ftp://127.0.0.1/").request("GET", "/x")


def test_a_connection_broken_mid_request_is_told_apart(server: Server,
                                                       closing: list[HttpClient]) -> None:
    client = HttpClient(server.url, name="echo")
    closing.append(client)
    with pytest.raises(ClosedMidRequest) as caught:
        client.request("POST", "/hang-up", b"x")
    assert str(caught.value).startswith(
        f"echo closed the connection during POST {server.url}/hang-up: "), caught.value
    assert client.request("GET", "/echo").status == 200  # and the client recovers
    # A GET on a connection opened for it is not sent again either (aiohttp's own retry
    # is off): the server saw it once.
    fresh = HttpClient(server.url, name="echo")
    closing.append(fresh)
    with pytest.raises(ClosedMidRequest):
        fresh.request("GET", "/hang-up")
    assert server.hits["/hang-up"] == 2


def test_a_kept_alive_connection_that_breaks_is_retried_once_if_idempotent(
        server: Server, closing: list[HttpClient]) -> None:
    client = HttpClient(server.url, name="echo")
    closing.append(client)
    client.request("GET", "/echo")
    assert client.request("GET", "/drop-once").status == 200  # dropped, then sent again
    assert server.hits["/drop-once"] == 2 and server.accepted == 2
    with pytest.raises(ClosedMidRequest):  # a POST is not sent twice
        client.request("POST", "/drop-once", b"once")
    assert server.hits["/drop-once"] == 3
    client.request("GET", "/echo")
    everything = HttpClient(server.url, retry_idle="all")  # fed's API: all idempotent
    closing.append(everything)
    everything.request("GET", "/echo")
    server.hits["/drop-once"] = 0
    assert everything.request("POST", "/drop-once", b"again").json()["body"] == "again"
    assert server.hits["/drop-once"] == 2


def test_a_connection_closed_while_idle_is_replaced_before_sending(
        closing: list[HttpClient]) -> None:
    server = Server(free_port(), keepalive=0.2).start()
    try:
        client = HttpClient(server.url)
        closing.append(client)
        client.request("GET", "/echo")
        first = client.local_address()
        assert first is not None
        wait_for(lambda: client.local_address() is None, 10, "the server's keep-alive close")
        # A POST is not retried after a failure; it must not be sent on the dead socket.
        assert client.request("POST", "/echo", b"once").json()["body"] == "once"
        assert client.local_address() not in (None, first)
        assert len(server.peers) == 2 and server.accepted == 2
    finally:
        server.stop()


def test_a_server_killed_and_restarted_under_the_client(closing: list[HttpClient]) -> None:
    port = free_port()
    server = Server(port).start()
    client = HttpClient(server.url, name="echo", timeout=10.0)
    closing.append(client)
    try:
        assert client.request("GET", "/echo").status == 200
        caught: list[BaseException] = []

        def in_flight() -> None:
            try:
                client.request("POST", "/slow", b"x")
            except ClosedMidRequest as exc:
                caught.append(exc)

        other = threading.Thread(target=in_flight)
        other.start()
        assert server.waiting.wait(10)
        server.stop()  # every connection aborted, the in-flight one too
        other.join(10)
        assert len(caught) == 1 and str(caught[0]).startswith(
            f"echo closed the connection during POST {server.url}/slow: "), caught
        with pytest.raises(CannotConnect, match="Connection refused"):
            client.request("GET", "/echo")  # retried once on a new connection: none
        server = Server(port).start()
        answer = client.request("GET", "/echo")
        assert answer.status == 200 and server.accepted == 1  # re-opened, once
        assert client.local_address() == server.peers[0]
    finally:
        server.stop()


def test_a_header_that_cannot_be_sent_is_not_echoed(server: Server,
                                                    closing: list[HttpClient]) -> None:
    client = HttpClient(server.url)
    closing.append(client)
    with pytest.raises(BadHeader) as caught:
        client.request("GET", "/echo", headers={"Authorization": "Bearer s3cr3t\nX: 1"})
    assert "s3cr3t" not in str(caught.value), caught.value
    assert str(caught.value).startswith(f"cannot send GET {server.url}/echo")
    assert server.hits == {}  # nothing was sent


def test_tls_with_a_ca_file(closing: list[HttpClient]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = self_signed(Path(tmp))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = Server(free_port(), tls=context).start()
        try:
            trusting = HttpClient(server.url, cafile=str(cert))
            closing.append(trusting)
            assert trusting.request("GET", "/echo").json()["method"] == "GET"
            assert trusting.request("GET", "/echo").status == 200
            assert server.accepted == 1
            untrusting = HttpClient(server.url, name="echo")  # the system's roots only
            closing.append(untrusting)
            with pytest.raises(CannotConnect, match="certificate verify failed"):
                untrusting.request("GET", "/echo")
            assert server.hits == {"/echo": 2}
        finally:
            server.stop()


def test_close_ends_the_loop_thread(server: Server) -> None:
    client = HttpClient(server.url, name="echo")
    assert client.loop_thread is None  # started by the first call, not before
    client.request("GET", "/echo")
    thread = client.loop_thread
    assert thread is not None and thread in threading.enumerate()
    client.close()
    assert not thread.is_alive() and thread not in threading.enumerate()
    assert client.loop_thread is None
    assert client.request("GET", "/echo").status == 200  # usable again: a new thread
    again = client.loop_thread
    assert again is not None and again is not thread
    client.close()
    client.close()  # idempotent
    assert not again.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "http echo"]


def test_the_async_client_in_a_running_loop(server: Server) -> None:
    async def calls() -> list[int]:
        client = AsyncHttpClient(server.url)
        try:
            answers = await asyncio.gather(*(client.request("GET", f"/echo?n={n}")
                                             for n in range(3)))
            answers.append(await client.request("GET", "/echo"))
            return [a.status for a in answers]
        finally:
            await client.close()

    assert asyncio.run(calls()) == [200] * 4
    assert 1 <= server.accepted <= 3  # three at once, then one that found one in the pool


FORKING = textwrap.dedent("""
    import os, sys, threading, warnings
    from mailferry.mail.http import HttpClient

    # Python 3.12+ warns on any fork of a process with threads: what is tested here is that
    # this client's thread does not make the child unsafe.
    warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)

    client = HttpClient(sys.argv[1])
    client.request("GET", "/echo?who=parent")
    before = client.local_address()
    pid = os.fork()
    if pid == 0:  # the child: its own loop and connection, then a normal exit
        answer = client.request("GET", "/echo?who=child")
        print("child", answer.status, client.local_address() != before, flush=True)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    # The child's exit ran its finalizers: the parent's kept-alive connection is intact.
    answer = client.request("GET", "/echo?who=parent-again")
    print("parent", os.waitstatus_to_exitcode(status), answer.status,
          client.local_address() == before, flush=True)
    print("threads", sorted(t.name for t in threading.enumerate()), flush=True)
    # No close(): the finalizer ends the loop thread at interpreter exit.
""")


def test_fork_and_interpreter_exit(server: Server) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-X", "dev", "-c", FORKING, server.url],
                          capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "child 200 True", "parent 0 200 True",
        f"threads ['MainThread', 'http {server.url}']"], done.stdout
    # -X dev shows ResourceWarnings and asyncio's complaints: nothing left unclosed.
    assert done.stderr == "", done.stderr
    assert server.accepted == 2  # the parent's connection, the child's own
    assert [path for path in server.hits] == ["/echo"] and server.hits["/echo"] == 3
