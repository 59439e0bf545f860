"""fed's delivery queues: isolation, LMTP per-recipient replies, split, smarthost, bounces."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fed.queue.groupcommit import GroupCommitter

from fedutil import FakeSystem, Fed, message, send
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

AD1 = "jean.dupont@corp.example"
BOSS = "boss@corp.example"


@pytest.fixture
def systems() -> Iterator[tuple[FakeSystem, FakeSystem, FakeSystem]]:
    s1, s2 = FakeSystem("s1").start(), FakeSystem("s2", protocol="smtp").start()
    relay = FakeSystem("relay", protocol="smtp").start()
    yield s1, s2, relay
    for system in (s1, s2, relay):
        system.stop()


def start_fed(tmp_path: Path, systems: Sequence[FakeSystem], *extra: str) -> Fed:
    s1, s2, relay = systems
    fed = Fed(tmp_path / "fed", [s1, s2],
              extra=["--smarthost", f"127.0.0.1:{relay.port}",
                     "--relay-network", "127.0.0.1/32", *extra]).start()
    fed.client.put_entry(AD1, s1.physical("jean"))
    fed.client.put_entry(BOSS, s2.physical("boss"))
    return fed


@pytest.fixture
def fed(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> Iterator[Fed]:
    running = start_fed(tmp_path, systems)
    yield running
    running.kill()


@pytest.mark.parametrize("trouble", ["hangs", "refuses-4xx"])
def test_a_slow_or_refusing_system_does_not_hold_up_the_others(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem], trouble: str) -> None:
    s1, s2, _ = systems
    if trouble == "hangs":
        s1.delay = 6.0  # longer than the test needs; fed's connections to s1 all wait
    else:
        s1.reply = "451 4.3.0 try later"
    for n in range(12):  # more than the 8 connections fed opens to one system
        assert send(fed.smtp_port, [AD1], message("stuck", f"s{n}@t"))[0] == 250
    if trouble == "hangs":
        assert s1.data_started.wait(10)
    assert send(fed.smtp_port, [BOSS], message("flows", "flow@t"))[0] == 250
    wait_for(lambda: s2.ids() == ["<flow@t>"], what="mail to s2 while s1 is in trouble")
    assert s1.received == []


def test_lmtp_one_transaction_with_a_reply_per_recipient(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, _, _ = systems
    for local in ("anna", "bert", "carl"):
        fed.client.put_entry(f"{local}@corp.example", s1.physical(local))
    s1.refuse[s1.physical("bert")] = "552 5.3.4 too big for bert's mailbox"
    rcpts = ["anna@corp.example", "bert@corp.example", "carl@corp.example"]
    assert send(fed.smtp_port, rcpts, message("three", "three@t"), mail_from=BOSS)[0] == 250
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    # One transaction carried the message; only bert's mailbox refused it.
    assert [sorted(m.rcpts) for m in s1.received] == [[s1.physical("anna"), s1.physical("carl")]]
    results = {d.rcpt: d.result for d in fed.client.deliveries()
               if d.message_id == "<three@t>"}
    assert results == {"anna@corp.example": "delivered", "bert@corp.example": "shunted",
                       "carl@corp.example": "delivered"}


def test_a_message_for_two_systems_is_split_per_destination(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, s2, relay = systems
    assert send(fed.smtp_port, [AD1, BOSS], message("both", "split@t"))[0] == 250
    wait_for(lambda: s1.ids() == ["<split@t>"] and s2.ids() == ["<split@t>"],
             what="one copy at each system")
    assert s1.received[0].rcpts == [s1.physical("jean")]
    assert s2.received[0].rcpts == [s2.physical("boss")]
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    assert relay.received == []


def dsn_parts(data: bytes) -> tuple[email.message.Message, str, str]:
    """(the DSN, its delivery-status text, its original-headers text)."""
    dsn = email.message_from_bytes(data, policy=email.policy.compat32)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = dsn.get_payload()
    assert isinstance(parts, list)
    blocks = [p for p in parts if isinstance(p, email.message.Message)]
    assert len(blocks) == len(parts)
    types = [p.get_content_type() for p in blocks]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = "\n".join(str(block) for block in blocks[1].get_payload())
    return dsn, status, str(blocks[2].get_payload())


def test_permanent_refusal_bounces_to_an_outside_sender_through_the_smarthost(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, s2, relay = systems
    s1.reply = "552 5.3.4 message too big"
    assert send(fed.smtp_port, [AD1], message("full", "full@t"),
                mail_from="someone@outside.example")[0] == 250
    wait_for(lambda: len(relay.received) == 1, what="the DSN at the smarthost")
    bounce = relay.received[0]
    assert bounce.mail_from == "<>" and bounce.rcpts == ["someone@outside.example"]
    dsn, status, headers = dsn_parts(bounce.data)
    assert dsn["To"] == "<someone@outside.example>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert "Reporting-MTA: dns; fed.invalid" in status
    assert f"Final-Recipient: rfc822; {AD1}" in status
    assert "Action: failed" in status and "Status: 5.3.4" in status
    assert "Diagnostic-Code: smtp; 552 5.3.4 message too big" in status
    assert "Message-ID: <full@t>" in headers and "hello" not in headers
    # The admin keeps the copy; nothing else is left in the queue.
    wait_for(lambda: fed.client.queue().pending == 0, what="empty queue")
    assert fed.client.queue().shunted == 1
    assert s2.received == []


def test_a_message_older_than_the_queue_lifetime_bounces(
        tmp_path: Path, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, s2, _ = systems
    s1.reply = "451 4.3.0 try later"
    fed = start_fed(tmp_path, systems, "--queue-lifetime", "1s")
    try:
        assert send(fed.smtp_port, [AD1], message("late", "late@t"), mail_from=BOSS)[0] == 250
        wait_for(lambda: len(s2.received) == 1, what="the DSN at the sender's system")
        bounce = s2.received[0]
        assert bounce.mail_from == "<>" and bounce.rcpts == [s2.physical("boss")]
        _, status, headers = dsn_parts(bounce.data)
        assert "Action: failed" in status and "Status: 4.3.0" in status
        assert "Diagnostic-Code: smtp; 451 4.3.0 try later" in status
        assert "Message-ID: <late@t>" in headers
        log = [d for d in fed.client.deliveries(rcpt=AD1)]
        assert log[0].result == "deferred" and log[-1].result == "shunted"
        assert "queue lifetime expired" in log[-1].detail
        assert s1.received == []
    finally:
        fed.kill()


def test_a_bounce_is_never_bounced(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, s2, relay = systems
    s1.reply = "554 5.6.0 content refused"
    assert send(fed.smtp_port, [AD1], message("dsn", "dsn@t"), mail_from="")[0] == 250
    wait_for(lambda: fed.client.queue().shunted == 1, what="the shunt")
    # A DSN would have been queued (durably) before the shunt was recorded.
    assert fed.client.queue().pending == 0
    last = fed.client.deliveries(rcpt=AD1)[-1]
    assert last.result == "shunted" and "no bounce" in last.detail
    assert s2.received == [] and relay.received == []


def test_group_commit_shares_one_write_among_the_waiting() -> None:
    """Items that arrive while a batch is being written go together in the next batch."""
    written: list[list[int]] = []
    started, gate = threading.Event(), threading.Event()

    def write(batch: Sequence[int]) -> list[BaseException | None]:
        started.set()
        gate.wait(10)
        written.append(list(batch))
        return [ValueError("odd") if n == 7 else None for n in batch]

    committed: list[int] = []

    async def scenario() -> list[BaseException | None]:
        async def commit(batch: Sequence[int]) -> None:
            committed.extend(batch)

        committer = GroupCommitter(write, commit, lambda n: None, overlap=1)
        committer.start()
        first = asyncio.ensure_future(committer.submit(0))
        assert await asyncio.to_thread(started.wait, 10)  # item 0 alone is being written
        rest = [asyncio.ensure_future(committer.submit(n)) for n in range(1, 10)]
        await asyncio.sleep(0)  # the nine submit() calls queue their items
        gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        await committer.close()
        return results

    results = asyncio.run(scenario())
    assert written == [[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert committed == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert [type(r).__name__ for r in results] == ["NoneType"] * 7 + ["ValueError", "NoneType",
                                                                      "NoneType"]


def test_the_null_sender_is_relayed_as_the_null_sender(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, _, _ = systems
    assert send(fed.smtp_port, [AD1], message("dsn", "null@t"), mail_from="")[0] == 250
    wait_for(lambda: s1.ids() == ["<null@t>"], what="delivery")
    assert s1.received[0].mail_from == "<>"


def test_leading_dots_survive_both_hops(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, _, _ = systems
    body = ".starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot"
    assert send(fed.smtp_port, [AD1], message("dots", "dots@t", body))[0] == 250
    wait_for(lambda: s1.ids() == ["<dots@t>"], what="delivery")
    assert s1.received[0].data.endswith(body.encode() + b"\r\n")


def test_one_connection_carries_message_after_message(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, _, _ = systems
    for n in range(5):
        assert send(fed.smtp_port, [AD1], message("reuse", f"reuse{n}@t"))[0] == 250
        def delivered(count: int = n + 1) -> bool:
            return len(s1.received) == count

        wait_for(delivered, what=f"message {n} delivered")
    assert len(s1.sessions) == 1
    s1.reply = "451 4.3.0 try later"  # a failed transaction (then RSET) keeps it open too
    assert send(fed.smtp_port, [AD1], message("reuse", "refused@t"))[0] == 250
    wait_for(lambda: any(d.result == "deferred" for d in fed.client.deliveries(rcpt=AD1)),
             what="a deferral")
    s1.reply = "250 2.0.0 Ok"
    wait_for(lambda: "<refused@t>" in s1.ids(), what="delivery after the deferral")
    assert len(s1.sessions) == 1


def test_a_recipient_waiting_in_a_queue_follows_a_directory_change(
        tmp_path: Path, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    """The route is resolved when a connection takes the message, not when it was queued."""
    s1, s2, _ = systems
    fed = start_fed(tmp_path, systems, "--workers", "1")  # one connection to s1
    try:
        s1.delay = 3.0  # the only connection to s1 is busy with the first message ...
        assert send(fed.smtp_port, [AD1], message("first", "first@t"))[0] == 250
        assert s1.data_started.wait(10)
        # ... so the second one waits in s1's queue while AD1 moves to s2.
        assert send(fed.smtp_port, [AD1], message("second", "second@t"))[0] == 250
        fed.client.put_entry(AD1, s2.physical("jean"))
        wait_for(lambda: s2.ids() == ["<second@t>"], what="the second message at s2")
        assert s2.received[0].rcpts == [s2.physical("jean")]
        wait_for(lambda: s1.ids() == ["<first@t>"], what="the first message at s1")
        s1.delay = 0
    finally:
        fed.kill()


def test_outside_mail_of_a_local_sender_goes_to_the_smarthost(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem, FakeSystem]) -> None:
    s1, s2, relay = systems
    # The relay policy (server.py) lets a local sender on a relay network out; delivery
    # routes every domain fed does not serve to the smarthost.
    assert send(fed.smtp_port, ["Friend@Elsewhere.example", AD1], message("out", "out@t"),
                mail_from=BOSS)[0] == 250
    wait_for(lambda: relay.ids() == ["<out@t>"] and s1.ids() == ["<out@t>"],
             what="one copy at the smarthost, one at s1")
    assert relay.received[0].rcpts == ["Friend@elsewhere.example"]  # local part kept
    assert relay.received[0].mail_from == BOSS
    wait_for(lambda: any(d.system == "smarthost" and d.result == "delivered"
                         for d in fed.client.deliveries()), what="the smarthost delivery logged")
    assert s2.received == []
