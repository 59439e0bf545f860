"""The tests' world starts again on new ports when one of its servers finds its port taken
between free_port's check and its own bind (another run on the machine bound it meanwhile),
a bounded number of times; any other early exit fails at once, naming the server's log."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.ports import ephemeral_start, free_port
from reconciler.errors import MailferryError

import world as world_module
from pfworld import PfWorld
from world import START_ATTEMPTS, World


@pytest.fixture
def taken() -> Iterator[int]:
    """A port below the ephemeral range with a listener on it: what free_port chose, taken."""
    with socket.socket() as sock:
        port = free_port()
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield port


def s1_lmtp(w: World) -> int:
    return int(w.base[0]["spec"]["maildir"]["lmtp"].rsplit(":", 1)[1])


def test_free_port_is_free_and_below_the_ephemeral_range() -> None:
    port = free_port()
    assert 1024 <= port < ephemeral_start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free right now


def test_a_port_taken_before_the_bind_is_chosen_again(
        tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    picks = iter([taken])  # s1's LMTP: the first port base_documents asks for
    monkeypatch.setattr(world_module, "free_port", lambda: next(picks, None) or free_port())
    w = World(tmp_path)
    try:
        assert s1_lmtp(w) != taken
        assert [s.name for s in w.embedded.servers] == ["fed", "s1", "s2"]
        assert all(s.process.poll() is None for s in w.embedded.servers)
        assert "address already in use" in (tmp_path / "logs" / "s1.log").read_text().lower()
        assert "address already in use" not in \
            (tmp_path / "logs-2" / "s1.log").read_text().lower()
        with socket.create_connection(("127.0.0.1", s1_lmtp(w)), timeout=5) as conn:
            assert conn.recv(100).startswith(b"220")  # the new port is s1's LMTP
    finally:
        w.stop()


def test_a_port_taken_every_time_gives_up_after_a_few_attempts(
        tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world_module, "free_port", lambda: taken)
    with pytest.raises(MailferryError, match="before it was ready") as raised:
        World(tmp_path)
    assert f"logs-{START_ATTEMPTS}" in str(raised.value)
    assert not (tmp_path / f"logs-{START_ATTEMPTS + 1}").exists()


def test_another_early_exit_fails_at_once_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "s1").write_text("a file where s1's maildir root should be\n")
    with pytest.raises(MailferryError, match="s1 exited with code") as raised:
        World(tmp_path)
    assert str(tmp_path / "logs" / "s1.log") in str(raised.value)
    assert not (tmp_path / "logs-2").exists()


def test_a_postfix_world_starts_again_and_keeps_fed_port_for_its_hosts(
        tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """PfWorld's Postfix hosts relay to fed's SMTP port: a new start picks new ports for the
    others but keeps that one."""
    picks = iter([taken])
    monkeypatch.setattr(world_module, "free_port", lambda: next(picks, None) or free_port())
    w = PfWorld(tmp_path)
    try:
        fed_doc = next(d for d in w.base if d["kind"] == "FedHub")
        assert fed_doc["spec"]["smtp"] == f"127.0.0.1:{w.fed_port}"
        assert s1_lmtp(w) != taken and (tmp_path / "logs-2" / "fed.log").exists()
        assert all(s.process.poll() is None for s in w.embedded.servers)
        with socket.create_connection(("127.0.0.1", w.fed_port), timeout=5) as conn:
            assert conn.recv(100).startswith(b"220")  # fed on the port the hosts know
    finally:
        w.stop()
