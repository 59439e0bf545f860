"""fed's control API through reconciler.fedclient: directory, up/down-sync, verify, errors."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import PermanentError, TemporaryError
from reconciler.fedclient import FedClient

from fedutil import TOKEN, FakeSystem, Fed
from helpers.waiting import wait_for
from sysutil import free_port

pytestmark = pytest.mark.timeout(60)

J, JD, PAUL = "jean.dupont@corp.example", "jd@corp.example", "paul@corp.example"


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Fed]:
    # The systems are only registered, never contacted, in these tests.
    systems = [FakeSystem("s1", port=free_port()), FakeSystem("s2", port=free_port())]
    running = Fed(tmp_path / "fed", systems).start()
    yield running
    running.kill()


def test_upsync_downsync_verify(fed: Fed) -> None:
    c = fed.client
    r1 = c.upsync("s1", {"jean@s1.invalid": [J, JD], "paul@s1.invalid": [PAUL]})
    assert r1.added == {J: "jean@s1.invalid", JD: "jean@s1.invalid", PAUL: "paul@s1.invalid"}
    assert r1.conflicts == []

    # s2 prestaged BOX2 and already lists AD1: the directory keeps routing AD1 to s1.
    r2 = c.upsync("s2", {"jean@s2.invalid": [J, "jean@s2.internal"],
                         "new@s2.invalid": ["new@corp.example"],
                         "dup@s2.invalid": ["New@Corp.Example"]})
    assert r2.added == {"jean@s2.internal": "jean@s2.invalid", "new@corp.example": "new@s2.invalid"}
    assert r2.conflicts == [{"address": "new@corp.example", "kept": "new@s2.invalid",
                             "rejected": "dup@s2.invalid"}]
    book = c.downsync()
    assert book.entries[J] == "jean@s1.invalid"
    assert book.version == c.directory().version and len(book.entries) == 5

    assert c.verify("s2", "jean@s2.invalid", [J]).ok
    negative = c.verify("s2", "jean@s2.invalid", [J, JD])
    assert not negative.ok and JD in negative.reason
    assert "no up-sync" in c.verify("s3", "x@s3.invalid", [J]).reason
    assert not c.verify("s2", "gone@s2.invalid", [J]).ok

    # s1 deleted paul's mailbox and no longer lists AD1 (it moved): paul goes, AD1 follows s2.
    r3 = c.upsync("s1", {"jean@s1.invalid": [JD]})
    assert r3.removed == [PAUL] and r3.updated == {J: "jean@s2.invalid"}
    assert c.lookup(PAUL) is None and c.lookup(J) == "jean@s2.invalid"
    assert c.downsync().version > book.version

    # An address nobody routes, claimed by s1 while s2 listed it first: s2 keeps it.
    assert c.delete_entry("new@corp.example")
    r4 = c.upsync("s1", {"jean@s1.invalid": [JD], "n@s1.invalid": ["new@corp.example"]})
    assert r4.conflicts == [{"address": "new@corp.example", "kept": "new@s2.invalid",
                             "rejected": "n@s1.invalid"}]


def test_directory_and_systems_routes(fed: Fed) -> None:
    c = fed.client
    entry = c.put_entry("Jean.Dupont@Corp.Example", "jean@s1.invalid")
    assert (entry.address, entry.physical) == (J, "jean@s1.invalid")
    assert c.lookup(J) == "jean@s1.invalid" and c.lookup("nobody@corp.example") is None
    assert c.directory().entries == {J: "jean@s1.invalid"}
    assert c.delete_entry(J) and not c.delete_entry(J)
    c.put_system("s3", "127.0.0.1", 2600, "smtp")
    assert [s.name for s in c.systems()] == ["s1", "s2", "s3"]
    with pytest.raises(PermanentError, match="400"):
        c.put_entry(J, "not-a-physical@corp.example")
    with pytest.raises(PermanentError, match="protocol"):
        c.put_system("s4", "127.0.0.1", 25, "uucp")
    tls = c.put_system("s5", "127.0.0.1", 2601, "smtp", tls="starttls", cafile="/etc/ca.pem")
    assert (tls.tls, tls.cafile) == ("starttls", "/etc/ca.pem")
    assert {s.name: (s.tls, s.cafile) for s in c.systems()}["s5"] == ("starttls", "/etc/ca.pem")
    with pytest.raises(PermanentError, match="tls must be one of"):
        c.put_system("s6", "127.0.0.1", 25, "smtp", tls="maybe")
    with pytest.raises(PermanentError, match="cafile must be an absolute path"):
        c.put_system("s6", "127.0.0.1", 25, "smtp", tls="starttls", cafile="ca.pem")
    with pytest.raises(PermanentError, match="not a physical address of s1"):
        c.upsync("s1", {"jean@s2.invalid": [J]})
    with pytest.raises(PermanentError, match="non-empty"):
        c.hold([])
    assert c.queue().pending == 0 and c.health()["ok"] is True


def test_bad_json_and_missing_token_are_refused(fed: Fed) -> None:
    base = f"http://127.0.0.1:{fed.control_port}"

    def status(path: str, body: bytes | None, token: str | None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(base + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert status("/v1/health", None, None)[0] == 401
    assert status("/v1/health", None, TOKEN + "x")[0] == 401
    assert status("/v1/health", None, TOKEN)[0] == 200
    code, text = status("/v1/holds", b"{not json", TOKEN)
    assert code == 400 and "JSON" in json.loads(text)["error"]
    assert status("/v1/flip", b'{"addresses": ["a@corp.example"], "from": "x"}', TOKEN)[0] \
        == 400


def test_client_maps_transport_errors(tmp_path: Path) -> None:
    dead = FedClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2)
    with pytest.raises(TemporaryError, match=r"127\.0\.0\.1"):
        dead.queue()
    with pytest.raises(TemporaryError):
        dead.wait_ready(0.3)

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": "busy"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = FedClient(f"http://127.0.0.1:{server.server_port}", TOKEN)
        with pytest.raises(TemporaryError, match="503 busy"):
            client.downsync()
    finally:
        server.shutdown()
        server.server_close()


def status_of(port: int, path: str, headers: dict[str, str], host: str = "127.0.0.1"
              ) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET, whatever the status."""
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_token_checks(fed: Fed) -> None:
    port = fed.control_port
    same_length = "x" * len(TOKEN)
    assert len(same_length) == len(TOKEN) and same_length != TOKEN
    for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer {same_length}"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}\u00e9".encode().decode("latin-1")}):
        for path in ("/v1/health", "/v1/queue/messages", "/metrics"):
            code, body = status_of(port, path, headers)
            assert code == 401, (headers, path)
            assert b"bearer token" in body
    assert status_of(port, "/v1/health", {"Authorization": f"bearer {TOKEN}"})[0] == 200


def test_control_api_listens_only_on_the_configured_address(tmp_path: Path) -> None:
    running = Fed(tmp_path / "fed", [], extra=["--control", "127.0.0.2:0"]).start()
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert status_of(running.control_port, "/v1/health", auth, host="127.0.0.2")[0] == 200
        for host in ("127.0.0.1", "localhost"):
            with pytest.raises(OSError), \
                    socket.create_connection((host, running.control_port), timeout=5):
                pass
    finally:
        running.kill()


def test_holds_report_their_age(fed: Fed) -> None:
    c = fed.client
    c.put_entry(J, "jean@s1.invalid")
    c.hold([J])
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def age() -> float:
        holds = json.loads(status_of(fed.control_port, "/v1/holds", auth)[1])["holds"]
        assert holds[J]["since"].endswith("+00:00") and holds[J]["waiting"] == 0
        return float(holds[J]["age_seconds"])

    first = age()
    assert first >= 0
    wait_for(lambda: age() > first, what="the hold to age")
