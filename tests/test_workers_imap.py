"""A provider's real throttling answer reaches every worker: a copy into a private Dovecot
behind the throttling proxy (`helpers/imap_proxy.py`) gets `NO [THROTTLED]`; the mover's
runner tells its system's pace, which in a worker is the fleet's (`SharedPace`): another
worker's pace of that system, with nothing of the first one's in its process, waits the
back-off too (its next message goes no sooner), and the copy loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from test_mover_provider import FAST, fill, ids, messages

from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.manifest import Manifest
from reconciler.mover.pace import LocalPace
from reconciler.mover.pipeline import Options
from reconciler.mover.runner import Job, run_jobs_async
from reconciler.state.store import open_store
from reconciler.workers.fleet import FleetPace, SharedPace

from dovecot import Dovecot, private_root, skip_unless_available
from helpers.imap_proxy import ThrottlingProxy
from pgutil import PrivatePostgres

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Dovecot, Dovecot, PrivatePostgres]]:
    skip_unless_available()
    root = private_root()
    users = {"fa": "pw-fa"}
    src, dst = Dovecot(root, "src", users).start(), Dovecot(root, "dst", users).start()
    pg = PrivatePostgres().start()
    yield src, dst, pg
    pg.stop()
    src.stop()
    dst.stop()


def test_a_real_throttling_answer_slows_another_worker(
        servers: tuple[Dovecot, Dovecot, PrivatePostgres], tmp_path: Path) -> None:
    src, dst, pg = servers
    fill(src, "fa", {"INBOX": messages("fa", 60)})
    store = open_store(pg.url)
    proxy = ThrottlingProxy(dst.port, refuse={6})
    # Worker A's pace of "dst" and worker B's: each its own local pace and its own handle
    # on the fleet's row; only the state store connects them.
    a = SharedPace(LocalPace("dst", backoff=FAST), FleetPace(store.engine, "dst", base=2.0))
    b = SharedPace(LocalPace("dst", backoff=FAST), FleetPace(store.engine, "dst", base=2.0))
    src_account = ImapAccount("127.0.0.1", src.port, "fa", "pw-fa", timeout=15)
    dst_account = ImapAccount("127.0.0.1", proxy.port, "fa", "pw-fa", timeout=15)
    job = Job("fa", lambda: ImapEndpoint(src_account, readonly=True),
              lambda: ImapEndpoint(dst_account, pace=a), options=Options(batch_messages=5))
    b_took: list[float] = []

    async def worker_b(done: asyncio.Event) -> None:
        while not done.is_set():  # bounded by the copy (itself bounded by its retries)
            await b.take(600)
            b_took.append(time.monotonic())
            await asyncio.sleep(0.05)

    async def both() -> None:
        done = asyncio.Event()
        other = asyncio.create_task(worker_b(done))
        try:
            reports = await run_jobs_async([job], manifest=Manifest(store), parallel=1)
        finally:
            done.set()
            await other
        assert reports[0].verified and reports[0].throttled == 1, reports[0].as_dict()

    try:
        asyncio.run(both())
    finally:
        proxy.close()
    refused = proxy.first("refuse")
    assert refused is not None
    with store.engine.connect() as conn:
        strikes, reason = conn.execute(text(
            "SELECT strikes, reason FROM system_pace WHERE system = 'dst'")).one()
    assert strikes == 1 and "THROTTLED" in reason
    # B's messages to dst, one each 50 ms before the refusal and after the back-off: none
    # from its next look at the shared row (at most 0.5 s later) to the end of the pause.
    before = [t for t in b_took if t <= refused]
    held = [round(t - refused, 2) for t in b_took if refused + 0.6 < t < refused + 1.5]
    after = [t for t in b_took if t >= refused + 1.5]
    # B runs before the refusal (its first take precedes the copy's login; a fast copy meets
    # the refusal before B's second take, so one is all that is certain), is held through
    # the back-off and sends again after it.
    assert len(before) >= 1 and after and not held, (len(before), held, len(after))
    got = ids(dst, "fa")
    assert len(got) == 60 and set(got.values()) == {1}
    store.close()
