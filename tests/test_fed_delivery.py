"""fed's delivery: holds, flip, retries, shunting, and no loss across kill -9."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import PermanentError

from fedutil import FakeSystem, Fed, message, send
from helpers.mail import Sender
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

AD1 = "jean.dupont@corp.example"
ALIAS = "jd@corp.example"


@pytest.fixture
def fed(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> Iterator[Fed]:
    s1, _ = systems
    running = Fed(tmp_path / "fed", list(systems)).start()
    for address in (AD1, ALIAS):
        running.client.put_entry(address, s1.physical("jean"))
    yield running
    running.kill()


def test_hold_flip_release_delivers_to_the_new_mailbox_only(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    held = fed.client.hold([AD1, ALIAS])
    assert held.held == [AD1, ALIAS]
    assert fed.client.hold([AD1]).held == [AD1]  # idempotent
    for n, rcpt in enumerate([AD1, ALIAS, AD1]):
        assert send(fed.smtp_port, [rcpt], message("held", f"h{n}@t"))[0] == 250
    # The scheduler's decision, observed: all three parked (a delivery would come first).
    wait_for(lambda: fed.client.queue().parked == 3, what="three recipients parked")
    assert s1.received == [] and s2.received == []
    assert fed.client.holds()[AD1].waiting == 2
    assert fed.client.queue().held == 3

    flipped = fed.client.flip([AD1, ALIAS], s1.physical("jean"), s2.physical("jean"))
    assert sorted(flipped.flipped) == [ALIAS, AD1]
    again = fed.client.flip([AD1, ALIAS], s1.physical("jean"), s2.physical("jean"))
    assert sorted(again.already) == [ALIAS, AD1] and again.flipped == []
    with pytest.raises(PermanentError, match="neither"):
        fed.client.flip([AD1], s1.physical("other"), s1.physical("third"))

    assert sorted(fed.client.release([AD1, ALIAS]).released) == [ALIAS, AD1]
    wait_for(lambda: len(s2.received) == 3, what="held mail at s2")
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    assert sorted(s2.ids()) == ["<h0@t>", "<h1@t>", "<h2@t>"]
    assert {r for m in s2.received for r in m.rcpts} == {"jean@s2.invalid"}
    assert s1.received == []


def test_a_batch_of_flips_is_one_transaction_all_or_nothing(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    boss = "boss@corp.example"
    fed.client.put_entry(boss, s1.physical("boss"))
    fed.client.hold([AD1, boss])
    for n, rcpt in enumerate([AD1, ALIAS, boss]):
        assert send(fed.smtp_port, [rcpt], message("held", f"b{n}@t"))[0] == 250
    before = fed.client.directory()

    # One flip of the batch conflicts (jean is not at s1's "other"): nothing is changed.
    with pytest.raises(PermanentError, match="neither"):
        fed.client.flip_many([([boss], s1.physical("boss"), s2.physical("boss")),
                              ([AD1, ALIAS], s1.physical("other"), s2.physical("jean"))])
    # An address in two flips of one batch: refused, nothing changed.
    with pytest.raises(PermanentError, match="two flips"):
        fed.client.flip_many([([boss], s1.physical("boss"), s2.physical("boss")),
                              ([boss], s1.physical("boss"), s2.physical("boss2"))])
    after = fed.client.directory()
    assert after.entries == before.entries and after.version == before.version

    results = fed.client.flip_many([
        ([AD1, ALIAS], s1.physical("jean"), s2.physical("jean")),
        ([boss, "new@corp.example"], s1.physical("boss"), s2.physical("boss"))])
    assert [sorted(r.flipped) for r in results] == [[ALIAS, AD1], [boss]]
    assert results[1].created == ["new@corp.example"]
    assert results[0].version == before.version + 4  # one per changed entry, as one by one
    entries = fed.client.directory().entries
    assert {a: entries[a] for a in (AD1, ALIAS, boss, "new@corp.example")} == {
        AD1: s2.physical("jean"), ALIAS: s2.physical("jean"), boss: s2.physical("boss"),
        "new@corp.example": s2.physical("boss")}
    again = fed.client.flip_many([([AD1, ALIAS], s1.physical("jean"), s2.physical("jean"))])
    assert sorted(again[0].already) == [ALIAS, AD1] and again[0].flipped == []
    assert s1.received == [] and s2.received == []  # still held: the flip released nothing

    fed.client.release([AD1, boss])
    wait_for(lambda: len(s2.received) == 3, what="held mail at s2")
    assert sorted(s2.ids()) == ["<b0@t>", "<b1@t>", "<b2@t>"]
    assert {r for m in s2.received for r in m.rcpts} == {s2.physical("jean"),
                                                         s2.physical("boss")}
    assert s1.received == []


def test_hold_waits_for_the_delivery_in_flight(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    s1.delay = 1.5
    assert send(fed.smtp_port, [AD1], message("slow", "slow@t"))[0] == 250
    assert s1.data_started.wait(10)
    started = time.monotonic()
    fed.client.hold([AD1])
    # The hold answered only after the slow delivery had finished at s1.
    assert time.monotonic() - started > 0.5
    assert s1.ids() == ["<slow@t>"]
    s1.delay = 0
    assert send(fed.smtp_port, [AD1], message("after", "after@t"))[0] == 250
    wait_for(lambda: fed.client.queue().parked == 1, what="the new message parked")
    assert s1.ids() == ["<slow@t>"]


def test_temporary_refusal_is_retried_until_delivered(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    s1.reply = "451 4.3.0 try later"
    assert send(fed.smtp_port, [AD1], message("retry", "r@t"))[0] == 250
    wait_for(lambda: len([d for d in fed.client.deliveries(rcpt=AD1)
                          if d.result == "deferred"]) >= 2, what="two deferrals")
    assert fed.client.queue().retrying == 1
    s1.reply = "250 2.0.0 Ok"
    wait_for(lambda: s1.ids() == ["<r@t>"], what="delivery after recovery")
    # The sink counts the message before fed has read its 250: wait for fed's record.
    wait_for(lambda: fed.client.deliveries(rcpt=AD1)[-1].result == "delivered",
             what="the delivery logged")


def test_unreachable_system_is_retried(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    s1.stop()
    assert send(fed.smtp_port, [AD1], message("down", "d@t"))[0] == 250
    wait_for(lambda: any("cannot connect" in d.detail for d in fed.client.deliveries()),
             what="a failed connection")
    s1.start()  # on a new port: tell fed, as the reconciler would
    fed.client.put_system("s1", "127.0.0.1", s1.port, "lmtp")
    wait_for(lambda: s1.ids() == ["<d@t>"], what="delivery after restart of the system")


def test_permanent_refusal_is_shunted_with_the_reason(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    s1.reply = "552 5.3.4 message too big for this mailbox"  # no retry can fix that
    fed.client.put_entry("boss@corp.example", s2.physical("boss"))
    assert send(fed.smtp_port, [AD1], message("full", "f@t"),
                mail_from="boss@corp.example")[0] == 250
    wait_for(lambda: fed.client.queue().shunted == 1, what="shunt")
    wait_for(lambda: len(s2.received) == 1, what="the bounce at the sender's system")
    assert fed.client.queue().pending == 0
    infos = list((fed.state_dir / "spool" / "shunt").glob("*.json"))
    assert len(infos) == 1
    info = json.loads(infos[0].read_text())
    assert info["code"] == 552 and "too big" in info["reason"]
    assert b"Message-ID: <f@t>" in infos[0].with_suffix(".eml").read_bytes()
    assert fed.client.deliveries(rcpt=AD1)[-1].result == "shunted"


@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_death_during_a_burst_loses_no_acknowledged_message(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem], how: str) -> None:
    s1, _ = systems
    s1.delay = 0.02  # slower than the burst: a backlog is queued when fed dies
    # Refusals once fed is gone are expected; only what fed answered 250 for must arrive.
    sender = Sender(fed.smtp_port, [ALIAS, AD1], tag="b", count=200, pause=0, seconds=60)
    sender.start()
    wait_for(lambda: len(sender.acked_ids) >= 40, timeout=30, what="40 acknowledged messages")
    if how == "kill-9":
        fed.kill()
    else:
        assert fed.stop() == 0  # a clean stop: in-flight writes finished, exit 0
    acked = sender.finish(15)
    assert len(acked) >= 40 and len(set(acked)) == len(acked), acked
    fed.start()  # same state dir
    wait_for(lambda: set(acked) <= set(s1.ids()), timeout=30,
             what=f"all {len(acked)} acknowledged messages delivered")
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")


def test_holds_survive_a_restart(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    fed.client.hold([AD1])
    assert send(fed.smtp_port, [AD1], message("kept", "k@t"))[0] == 250
    assert fed.stop() == 0
    fed.start()
    holds = fed.client.holds()
    assert list(holds) == [AD1] and holds[AD1].waiting == 1
    wait_for(lambda: fed.client.queue().parked == 1, what="the reloaded message parked")
    assert s1.received == []
    fed.client.release([AD1])
    wait_for(lambda: s1.ids() == ["<k@t>"], what="delivery after release")


def test_address_and_alias_in_one_message_reach_the_mailbox_once(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    other = "colleague@corp.example"
    fed.client.put_entry(other, s1.physical("colleague"))
    assert send(fed.smtp_port, [AD1, ALIAS, other], message("both", "both@t"))[0] == 250
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    # Every recipient has its outcome, and an outcome is recorded only after the system's
    # reply: any copy fed sent has arrived by now (none can still be on its way).
    log = wait_for(lambda: (rows := fed.client.deliveries()) and len(
        [d for d in rows if d.queue_id == rows[0].queue_id]) == 3 and rows,
        what="three outcomes logged")
    assert sorted(d.result for d in log if d.queue_id == log[0].queue_id) == [
        "delivered", "delivered", "duplicate"]
    rcpts = sorted(r for m in s1.received for r in m.rcpts)
    assert rcpts == [s1.physical("colleague"), s1.physical("jean")]


def test_kill_9_under_concurrent_load_loses_no_acknowledged_message(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    """Eight clients at once (so acceptances share group commits), kill -9 mid-run."""
    s1, _ = systems
    s1.delay = 0.01  # delivery lags behind: a backlog is queued when fed dies
    clients = [Sender(fed.smtp_port, [ALIAS, AD1], tag=f"c{k}-", count=150, pause=0,
                      seconds=60) for k in range(8)]
    for client in clients:
        client.start()
    wait_for(lambda: sum(len(c.acked_ids) for c in clients) >= 200, timeout=40,
             what="200 acknowledged messages")
    fed.kill()
    acked = [mid for client in clients for mid in client.finish(15)]
    promised = set(acked)
    assert len(promised) == len(acked) >= 200
    assert len(promised) < 8 * 150, "the kill came too late to test anything"
    fed.start()
    wait_for(lambda: promised <= set(s1.ids()), timeout=40,
             what=f"all {len(promised)} acknowledged messages delivered")
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
