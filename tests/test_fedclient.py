"""The fed client's transport against a real fed: per-route timeouts, three distinct
transport errors, one kept-alive connection.

The hold is the case that matters: fed answers a hold once no delivery for the addresses
is in flight, and waits for that up to its --hold-timeout. A client that gives up earlier
reports a hold in progress as an outage.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import TemporaryError
from reconciler.fedclient import FedClient

from fedutil import TOKEN, FakeSystem, Fed, message, send
from sysutil import free_port

pytestmark = pytest.mark.timeout(90)

ANN = "ann@corp.example"


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[Fed, FakeSystem]]:
    """fed (--hold-timeout 3) with one delivery to ANN in flight: its system answers DATA
    only after 30 s (fed gives up after its --delivery-timeout of 10 s)."""
    slow = FakeSystem("s1", delay=30.0).start()
    fed = Fed(tmp_path / "fed", [slow], extra=["--hold-timeout", "3"]).start()
    fed.client.put_entry(ANN, slow.physical("ann"))
    send(fed.smtp_port, [ANN], message("slow", "<slow-1@outside.example>"))
    assert slow.data_started.wait(20), fed.log()
    yield fed, slow
    fed.kill()
    slow.stop()


def _client(fed: Fed, **kwargs: object) -> FedClient:
    return FedClient(f"http://127.0.0.1:{fed.control_port}", TOKEN, **kwargs)  # type: ignore[arg-type]


def test_a_hold_waiting_for_deliveries_is_not_an_outage(busy: tuple[Fed, FakeSystem]) -> None:
    fed, _slow = busy
    # Every other route gives up after 1 s; the hold waits as long as fed's hold does.
    client = _client(fed, timeout=1.0)
    with pytest.raises(TemporaryError) as caught:
        client.hold([ANN])
    text = str(caught.value)
    assert "503 hold recorded but" in text and "in flight" in text, text
    assert ANN in client.holds()  # recorded: fed answered after its own hold timeout


def test_no_answer_yet_and_cannot_connect_are_told_apart(busy: tuple[Fed, FakeSystem]) -> None:
    fed, _slow = busy
    client = _client(fed, timeouts={("POST", "/v1/holds"): 1.0})
    with pytest.raises(TemporaryError) as caught:
        client.hold([ANN])
    assert str(caught.value).startswith(
        f"no answer yet from fed to POST http://127.0.0.1:{fed.control_port}/v1/holds after "
        "1 s (fed may still be working on it"), caught.value
    port = free_port()
    with pytest.raises(TemporaryError) as refused:
        FedClient(f"http://127.0.0.1:{port}", TOKEN).queue()
    assert str(refused.value) == (f"cannot connect to fed at http://127.0.0.1:{port} (GET "
                                  f"http://127.0.0.1:{port}/v1/queue): Connection refused")


def test_one_connection_is_kept_alive_and_reopened_after_a_restart(tmp_path: Path) -> None:
    port = free_port()
    system = FakeSystem("s1", port=free_port())
    fed = Fed(tmp_path / "fed", [system], extra=["--control", f"127.0.0.1:{port}"]).start()
    try:
        client = _client(fed)
        client.health()
        first = client.http.local_address()
        for _ in range(5):
            client.directory()
            client.queue()
        assert client.http.local_address() == first  # one connection for all
        assert fed.stop() == 0
        fed.start()
        # fed closed the kept-alive connection: the next call opens a new one, once.
        assert client.health()
        assert client.http.local_address() != first
    finally:
        fed.kill()
