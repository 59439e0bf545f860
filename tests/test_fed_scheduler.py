"""The delivery scheduler (fed/delivery/scheduler.py's ``Deliverer``) on a fake clock.

Everything is real but time: the spool and its SQLite store in tmp_path, the directory
and holds in a shared SQLite database, the destination systems as small LMTP/SMTP
servers on 127.0.0.1 (tests/scripted_smtp.py's ``Sink``) answering each recipient from a
table. Time is the ``FakeClock`` given to the Deliverer (its ``clock`` seam): a test
moves it past a recipient's next try and wakes the scheduler, so the back-off schedule,
the queue lifetime and "not before its time" are checked in milliseconds. Nothing is
asserted after a sleep: a test that says something did *not* happen first waits for a
later event (``barrier``: a message to another system, delivered) that proves the
scheduler has looked since.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from fed.admin.queueadmin import QueueAdmin
from fed.delivery.scheduler import Deliverer, DeliverySettings
from fed.queue.queuefile import new_queue_id
from fed.queue.spool import Spool
from fed.queue.store import Store
from fed.routing.directory import Directory
from fed.routing.holds import Holds
from fed.routing.nodes import NodeRegistry
from fed.routing.shared_db import SharedDB, default_url

from scripted_smtp import Sink, until

A, B, C, D, E = (f"{n}@corp.example" for n in "abcde")
SENDER = "sender@elsewhere.example"
BARRIER = "barrier@corp.example"  # lives on s2: its delivery proves the scheduler looked
SETTINGS = DeliverySettings(retry_base=10.0, retry_max=25.0, concurrency=8, timeout=2.0,
                            helo_name="fed.test", domains=("corp.example",),
                            queue_lifetime=3600.0)


class FakeClock:
    """The scheduler's time, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()  # wall clock; the spool stamps arrivals with the real time
        self.mono = 0.0  # monotonic: paces the scheduler's periodic look at the store

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


@dataclass
class Hub:
    """A Deliverer running on the test's loop, with what it works on."""

    clock: FakeClock
    spool: Spool
    store: Store
    directory: Directory
    deliverer: Deliverer
    s2: Sink
    barriers: list[str] = field(default_factory=list)

    async def accept(self, *rcpts: str, sender: str = SENDER) -> str:
        """Queue one message durably, as the SMTP side does; its queue id."""
        queue_id = new_queue_id()
        body = f"Subject: {queue_id}\r\nMessage-ID: <{queue_id}@test>\r\n\r\nbody\r\n"
        await self.spool.accept(queue_id, sender, list(rcpts), body.encode(),
                                f"<{queue_id}@test>")
        return queue_id

    def results(self, rcpt: str) -> list[str]:
        """The delivery log's results for `rcpt`, oldest first."""
        return [str(r["result"]) for r in self.deliverer.log_rows(rcpt, None, 1000)]

    def last(self, rcpt: str) -> dict[str, object]:
        return self.deliverer.log_rows(rcpt, None, 1000)[-1]

    def recipient(self, queue_id: str, rcpt: str) -> dict[str, object]:
        self.spool.write_outcomes()
        rows = self.store.query("SELECT * FROM recipients WHERE queue_id = ? AND rcpt = ?",
                                (queue_id, rcpt))
        return dict(rows[0]) if rows else {}

    def shunted(self) -> list[str]:
        """Recipients shunted for the admin."""
        self.spool.write_outcomes()
        return sorted(str(s["rcpt"]) for s in self.spool.shunted())

    async def later(self, seconds: float) -> None:
        """Move the clock and let the scheduler look (as a release or a flush would)."""
        self.clock.now += seconds
        self.clock.mono += seconds
        self.deliverer.wake()

    async def barrier(self) -> None:
        """A message to s2, delivered: the scheduler has run since the last move."""
        queue_id = await self.accept(BARRIER)
        self.barriers.append(f"<{queue_id}@test>")
        await until(lambda: self.s2.got("barrier@s2.invalid") == self.barriers,
                    "the barrier message")
        # The sink has the message when it answered 250; the delivery log is written after
        # that answer reached fed: wait for it too, or a test reading the log races it.
        await until(lambda: self.results(BARRIER).count("delivered") == len(self.barriers),
                    "the barrier's delivery in the log")


@asynccontextmanager
async def hub(tmp_path: Path, s1: Sink, settings: DeliverySettings = SETTINGS,
              smarthost: Sink | None = None) -> AsyncIterator[Hub]:
    """s1 (the sink given) and s2 registered, a..e@corp.example on s1, the barrier on
    s2; a Deliverer started on them."""
    async with asyncio.timeout(20), Sink() as s2:
        if smarthost is not None:
            settings = replace(settings, smarthost=("127.0.0.1", smarthost.port))
        store = Store(tmp_path / "fed.db")
        shared = SharedDB(default_url(str(tmp_path)))
        directory = Directory(shared)
        spool = Spool(tmp_path / "spool", store)
        holds = Holds(shared, directory, NodeRegistry(shared), store, spool.waiting)
        holds.fresh_until = math.inf  # no node agent here: this node's view is current
        directory.put_system("s1", "127.0.0.1", s1.port, "lmtp" if s1.lmtp else "smtp")
        directory.put_system("s2", "127.0.0.1", s2.port, "lmtp")
        for rcpt in (A, B, C, D, E):
            directory.put(rcpt, f"{rcpt.split('@')[0]}@s1.invalid")
        directory.put(BARRIER, "barrier@s2.invalid")
        clock = FakeClock()
        deliverer = Deliverer(store, spool, directory, holds, settings, clock=clock)
        deliverer.load()
        spool.start()
        task = asyncio.create_task(deliverer.run())
        try:
            yield Hub(clock, spool, store, directory, deliverer, s2)
        finally:
            await deliverer.stop(grace=1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await spool.close()
            shared.close()
            store.close()


def physical(rcpt: str) -> str:
    return f"{rcpt.split('@')[0]}@s1.invalid"


def test_a_deferred_recipient_comes_back_on_the_back_off_schedule(tmp_path: Path) -> None:
    """451, 451, 451, then 250: each retry waits its doubling, jittered step (10 s, 20 s,
    then the 25 s cap), is not tried a moment before it, and the recipient ends done."""
    s1 = Sink()
    for _ in range(3):
        s1.script(physical(A), "451 4.2.0 try later", after_data=True)

    async def main() -> None:
        async with s1, hub(tmp_path, s1) as h:
            queue_id = await h.accept(A)
            steps = [(5.0, 10.0), (10.0, 20.0), (12.5, 25.0)]  # attempt n: [step/2, step]
            for attempt, (low, high) in enumerate(steps, start=1):
                def failed(n: int = attempt) -> bool:
                    return h.results(A).count("deferred") == n

                await until(failed, f"failure {attempt}")
                row = h.recipient(queue_id, A)
                assert row["attempts"] == attempt and row["status"] == "pending"
                wait = float(row["next_try"]) - h.clock.now  # type: ignore[arg-type]
                assert low <= wait <= high, (attempt, wait)
                await h.later(wait - 0.5)  # not yet due
                await h.barrier()
                assert s1.rcpts[physical(A)] == attempt, "retried before its time"
                await h.later(0.5)
            await until(lambda: h.results(A)[-1:] == ["delivered"], "the delivery")
            assert h.results(A) == ["deferred"] * 3 + ["delivered"]
            assert s1.got(physical(A)) == [f"<{queue_id}@test>"]
            assert h.recipient(queue_id, A).get("status", "done") == "done"

    asyncio.run(main())


def test_a_recipient_done_is_never_sent_again(tmp_path: Path) -> None:
    """One LMTP transaction, two recipients: a takes it (250), b is deferred (452). The
    retry carries b alone; a's mailbox has the message once, and a is not even offered
    it again (no second RCPT)."""
    s1 = Sink()
    s1.script(physical(B), "452 4.2.2 over quota", after_data=True)

    async def main() -> None:
        async with s1, hub(tmp_path, s1) as h:
            queue_id = await h.accept(A, B)
            await until(lambda: h.results(B) == ["deferred"], "b deferred")
            assert h.results(A) == ["delivered"]
            await h.later(SETTINGS.retry_max)
            await until(lambda: h.results(B) == ["deferred", "delivered"], "b's retry")
            await h.later(SETTINGS.retry_max)  # nothing is left to come back
            await h.barrier()
            assert s1.got(physical(A)) == s1.got(physical(B)) == [f"<{queue_id}@test>"]
            assert s1.rcpts[physical(A)] == 1 and s1.rcpts[physical(B)] == 2
            assert h.results(A) == ["delivered"]
            assert queue_id not in h.deliverer._left  # the message is finished
            await until(lambda: not h.spool.path(queue_id).exists(), "the spool file gone")

    asyncio.run(main())


def test_each_destination_gets_at_most_its_concurrency(tmp_path: Path) -> None:
    """s1 hangs on to every message (a slow system). With concurrency 2, five messages
    for s1 open two connections and three wait in s1's queue; mail for s2 goes through
    meanwhile. When s1 answers, all five arrive, never over more than two connections."""
    s1 = Sink(gate=asyncio.Event())
    settings = replace(SETTINGS, concurrency=2)

    async def main() -> None:
        async with s1, hub(tmp_path, s1, settings) as h:
            ids = [await h.accept(rcpt) for rcpt in (A, B, C, D, E)]
            await until(lambda: s1.waiting == 2, "two transactions in flight on s1")
            dest = h.deliverer._dests["s1"]
            await until(lambda: len(dest.queue) == 3, "three recipients queued for s1")
            await h.barrier()  # s2 is not held up by s1
            assert s1.server is not None and s1.server.most_active == 2
            assert dest.workers == 2
            s1.gate.set()  # type: ignore[union-attr]
            await until(lambda: len(s1.delivered) == 5, "the five messages on s1")
            assert sorted(mid for _, mid in s1.delivered) == sorted(f"<{q}@test>" for q in ids)
            assert s1.server.most_active == 2 and s1.server.sessions == 2

    asyncio.run(main())


def test_each_message_wakes_one_idle_connection_and_the_spare_ones_close(
        tmp_path: Path) -> None:
    """A burst opens four connections to s1. Afterwards, mail one message at a time goes
    over one of them (the one idle the shortest), and the three spare connections reach
    idle_close and close while that mail keeps flowing: a queued message wakes one idle
    worker. (Waking all of them, as one shared Event did, cost every idle worker a task
    switch and a new timer per message and kept all four connections open for good.)"""
    s1 = Sink(gate=asyncio.Event())
    settings = replace(SETTINGS, concurrency=4, idle_close=0.3)

    async def main() -> None:
        async with s1, hub(tmp_path, s1, settings) as h:
            for rcpt in (A, B, C, D):
                await h.accept(rcpt)
            await until(lambda: s1.waiting == 4, "four transactions in flight on s1")
            s1.gate.set()  # type: ignore[union-attr]
            await until(lambda: len(s1.delivered) == 4, "the burst delivered")
            dest = h.deliverer._dests["s1"]
            await until(lambda: len(dest.waiters) == 4, "four idle workers")
            loop = asyncio.get_running_loop()
            sent, ends = 0, loop.time() + 5 * settings.idle_close
            while loop.time() < ends and sent < 500:  # one at a time, bounded
                await h.accept(E)
                sent += 1
                delivered = 4 + sent
                await until(lambda: len(s1.delivered) == delivered,  # noqa: B023
                            f"message {sent}")
            assert s1.server is not None
            assert s1.server.sessions == 4, "a new connection was opened"
            assert s1.server.active == 1, f"{s1.server.active} connections still open"
            assert dest.workers == 1
            assert len(s1.got(physical(E))) == sent

    asyncio.run(main())


def test_a_4xx_is_deferred_and_a_managed_systems_5xx_for_its_mailbox_is_refused(
        tmp_path: Path) -> None:
    """A 4xx: deferred. A 5xx 5.1.1 from a system fed routes to for a mailbox the
    directory places there is a disagreement, not the sender's fault (invariant 9):
    logged ``refused``, retried like a 4xx on a fresh session, never bounced."""
    s1 = Sink()
    s1.script(physical(A), "451 4.3.0 busy")
    s1.script(physical(B), "550 5.1.1 unknown user")

    async def main() -> None:
        async with s1, hub(tmp_path, s1) as h:
            queue_id = await h.accept(A, B)
            await until(lambda: h.results(A) and h.results(B), "both outcomes")
            assert h.results(A) == ["deferred"] and h.results(B) == ["refused"]
            assert "550 5.1.1 unknown user" in str(h.last(B)["detail"])
            assert h.recipient(queue_id, B)["status"] == "pending"
            assert h.shunted() == []
            sessions = s1.server.sessions if s1.server else 0
            await h.later(SETTINGS.retry_max)
            await until(lambda: h.results(A)[-1:] == h.results(B)[-1:] == ["delivered"],
                        "both delivered on retry")
            assert s1.server is not None and s1.server.sessions == sessions + 1
            assert SENDER not in s1.rcpts  # no bounce anywhere

    asyncio.run(main())


def test_what_no_retry_can_fix_is_shunted_and_bounced(tmp_path: Path) -> None:
    """A 5xx about the message itself (5.3.4 too big) from a managed system, a 5xx from
    the smarthost, an address in no directory: each is shunted for the admin at once and
    the sender gets one DSN (through the smarthost: the sender's domain is not fed's)."""
    s1 = Sink()
    s1.script(physical(A), "552 5.3.4 message too big", after_data=True)
    smart = Sink(lmtp=False)
    outside = "someone@far.example"
    smart.script(outside, "550 5.7.1 relaying denied")
    unknown = "nobody@corp.example"

    async def main() -> None:
        async with s1, smart, hub(tmp_path, s1, smarthost=smart) as h:
            ids = {rcpt: await h.accept(rcpt) for rcpt in (A, outside, unknown)}
            for rcpt in ids:
                def shunted(r: str = rcpt) -> bool:
                    return h.results(r) == ["shunted"]

                await until(shunted, f"{rcpt} shunted")
            await until(lambda: len(smart.got(SENDER)) == 3, "three bounces to the sender")
            assert "552 5.3.4 message too big" in str(h.last(A)["detail"])
            assert "550 5.7.1 relaying denied" in str(h.last(outside)["detail"])
            assert "5.1.1" in str(h.last(unknown)["detail"])
            assert all(f"bounced to <{SENDER}>" in str(h.last(r)["detail"]) for r in ids)
            assert h.shunted() == sorted(ids)
            dsns = [smart.messages[mid] for mid in smart.got(SENDER)]
            for rcpt, queue_id in ids.items():
                assert sum(queue_id.encode() in dsn and rcpt.encode() in dsn
                           for dsn in dsns) == 1, rcpt
            assert s1.rcpts[physical(A)] == 1  # not retried
            assert all(h.recipient(q, r).get("status", "done") != "pending"
                       for r, q in ids.items())

    asyncio.run(main())


def test_a_null_sender_gets_no_bounce(tmp_path: Path) -> None:
    """A failed bounce (null sender) is shunted, and no DSN is made of it (no loop)."""
    async def main() -> None:
        async with Sink() as s1, hub(tmp_path, s1) as h:
            queue_id = await h.accept("nobody@corp.example", sender="")
            await until(lambda: h.results("nobody@corp.example") == ["shunted"], "shunt")
            assert "no bounce" in str(h.last("nobody@corp.example")["detail"])
            await h.barrier()
            assert h.shunted() == ["nobody@corp.example"]
            assert h.recipient(queue_id, "nobody@corp.example").get("status") != "pending"
            logged = {str(r["queue_id"]) for r in h.deliverer.log_rows(None, None, 1000)}
            assert logged == {queue_id, h.barriers[0][1:-6]}  # no DSN was queued

    asyncio.run(main())


def test_a_recipient_deferred_past_the_queue_lifetime_fails(tmp_path: Path) -> None:
    """Deferred for longer than queue_lifetime, the next failure is final: shunted, the
    DSN says the lifetime expired and what the last error was."""
    s1 = Sink()
    for _ in range(3):
        s1.script(physical(A), "451 4.2.0 still down", after_data=True)

    async def main() -> None:
        async with s1, hub(tmp_path, s1) as h:
            await h.accept(A)
            await until(lambda: h.results(A) == ["deferred"], "first failure")
            await h.later(SETTINGS.queue_lifetime + 1)
            await until(lambda: h.results(A) == ["deferred", "shunted"], "expiry")
            detail = str(h.last(A)["detail"])
            assert "queue lifetime expired" in detail and "451 4.2.0 still down" in detail
            assert s1.rcpts[physical(A)] == 2  # one try after the lifetime, not a third

    asyncio.run(main())


@pytest.mark.parametrize("how", ["control", "log"])
def test_a_deleted_message_is_dropped_from_delivery(tmp_path: Path, how: str) -> None:
    """Two messages deleted by an admin: one deferred (in back-off), one waiting in s1's
    queue behind a slow transaction. Neither is delivered afterwards: not when its retry
    falls due, not when s1 frees up. `control`: the control API's delete (Deliverer.drop
    at once); `log`: another process's `fed queue delete`, seen in the delivery log."""
    s1 = Sink(gate=asyncio.Event())
    s1.script(physical(A), "451 4.3.0 later", after_data=True)
    s1.gate.set()  # type: ignore[union-attr]
    settings = replace(SETTINGS, concurrency=1)

    async def main() -> None:
        async with s1, hub(tmp_path, s1, settings) as h:
            admin = QueueAdmin(h.spool, h.directory, h.deliverer.holds)
            deferred = await h.accept(A)
            await until(lambda: h.results(A) == ["deferred"], "a deferred")
            s1.gate = asyncio.Event()  # s1 now holds on to what it gets
            slow = await h.accept(B)
            await until(lambda: s1.waiting == 1, "b's transaction in flight")
            queued = await h.accept(C)
            dest = h.deliverer._dests["s1"]
            await until(lambda: len(dest.queue) == 1, "c waiting in s1's queue")
            for queue_id in (deferred, queued):
                assert admin.delete(queue_id) == 1
            if how == "control":
                h.deliverer.drop({deferred, queued})
            else:
                h.deliverer.wake()
            await until(lambda: not dest.queue, "c dropped from s1's queue")
            s1.gate.set()
            if how == "control":
                # a's retry falls due before the scheduler's next look at the store
                # (the monotonic clock stands still): only drop() can have forgotten it
                h.clock.now += SETTINGS.retry_max
            else:
                await h.later(SETTINGS.retry_max)  # a's retry would be due now
            await h.barrier()
            await until(lambda: h.results(B) == ["delivered"], "b delivered")
            assert s1.rcpts[physical(A)] == 1 and s1.rcpts[physical(C)] == 0
            assert deferred not in h.deliverer._left and queued not in h.deliverer._left
            assert h.results(A) == ["deferred", "deleted"] and h.results(C) == ["deleted"]
            assert s1.got(physical(B)) == [f"<{slow}@test>"]

    asyncio.run(main())
