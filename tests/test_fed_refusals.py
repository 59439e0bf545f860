"""A managed system's refusal is not the sender's problem; a refresh retires fed's connections.

DESIGN invariant 9: when a system fed routes to by its own directory answers 5xx for a
physical address the directory places there, fed defers (with back-off, on a new session),
alerts (log, delivery log, /metrics, /v1/refusals) and bounces only after the queue
lifetime. `POST /v1/systems/{name}/refresh` retires every pooled connection to the system
and probes addresses on a fresh session (what the reconciler calls before a flip).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import PermanentError

from fedutil import FakeSystem, Fed, message, send
from helpers.waiting import wait_for
from test_fed_queue import samples, scrape

pytestmark = pytest.mark.timeout(90)

AD1 = "jean.dupont@corp.example"
BOSS = "boss@corp.example"
UNKNOWN = "550 5.1.1 <jean@s1.invalid>: Recipient address rejected: User unknown in virtual " \
          "mailbox table"


def start(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem], *extra: str) -> Fed:
    s1, s2 = systems
    fed = Fed(tmp_path / "fed", [s1, s2], extra=list(extra)).start()
    fed.client.put_entry(AD1, s1.physical("jean"))
    fed.client.put_entry(BOSS, s2.physical("boss"))
    return fed


@pytest.fixture
def fed(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> Iterator[Fed]:
    running = start(tmp_path, systems)
    yield running
    running.kill()


def test_a_managed_systems_5xx_is_deferred_alerted_and_retried_on_a_new_session(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    s1.reply = UNKNOWN
    assert send(fed.smtp_port, [AD1], message("x", "refused@t"), mail_from=BOSS)[0] == 250
    wait_for(lambda: sum(d.result == "refused" for d in fed.client.deliveries(rcpt=AD1)) >= 3,
             what="three refused attempts")
    queue = fed.client.queue()
    assert queue.shunted == 0 and queue.pending == 1 and queue.retrying == 1
    assert s2.received == []  # no bounce to the sender
    assert not list((fed.state_dir / "spool" / "shunt").glob("*"))
    # Each retry went out on a new session: an old one may be served from old tables.
    assert len(s1.sessions) >= 3
    refusals = fed.client.refusals()
    assert [(r.physical, r.system) for r in refusals] == [("jean@s1.invalid", "s1")]
    assert refusals[0].count >= 3 and "User unknown" in refusals[0].reply
    got = samples(scrape(fed)[1])
    assert got[("fed_system_refusals_total", (("destination", "s1"),))] >= 3
    assert "s1 refused <jean@s1.invalid>, which fed's directory places there" in fed.log()
    s1.reply = "250 2.0.0 Ok"  # the system is fixed: the next retry delivers, once
    wait_for(lambda: s1.ids() == ["<refused@t>"], what="delivery after the fix")
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    assert fed.client.deliveries(rcpt=AD1)[-1].result == "delivered"
    assert fed.client.queue().shunted == 0 and s2.received == []


def test_a_managed_systems_5xx_bounces_only_after_the_queue_lifetime(
        tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    s1.reply = UNKNOWN
    fed = start(tmp_path, systems, "--queue-lifetime", "2s")
    try:
        assert send(fed.smtp_port, [AD1], message("x", "late@t"), mail_from=BOSS)[0] == 250
        wait_for(lambda: len(s2.received) == 1, what="the DSN at the sender's system")
        log = fed.client.deliveries(rcpt=AD1)
        assert log[0].result == "refused" and log[-1].result == "shunted"
        assert "queue lifetime expired" in log[-1].detail and "User unknown" in log[-1].detail
        assert sum(d.result == "refused" for d in log) >= 2
    finally:
        fed.kill()


def test_refresh_retires_pooled_connections_and_probes_on_a_fresh_session(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    for n in range(2):
        assert send(fed.smtp_port, [AD1], message("x", f"pooled{n}@t"))[0] == 250
        wait_for(lambda n=n: len(s1.received) == n + 1, what="delivery")  # type: ignore[misc]
    assert len(s1.sessions) == 1  # one reused connection
    before = {s.name: s.generation for s in fed.client.systems()}
    replies = fed.client.refresh_system("s1", [s1.physical("jean")])
    assert replies == {"jean@s1.invalid": "250 OK"}
    assert {s.name: s.generation for s in fed.client.systems()} == \
        {**before, "s1": before["s1"] + 1}
    assert send(fed.smtp_port, [AD1], message("x", "fresh@t"))[0] == 250
    wait_for(lambda: len(s1.received) == 3, what="delivery after the refresh")
    assert len(s1.sessions) == 2  # the pooled connection was retired, a new one carried it
    with pytest.raises(PermanentError, match="not a physical address of s1"):
        fed.client.refresh_system("s1", ["jean@s2.invalid"])
    with pytest.raises(PermanentError, match="404"):
        fed.client.refresh_system("nowhere")
