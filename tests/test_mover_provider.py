"""Provider behaviour (issue 17): a system that throttles, connection limits, daily byte
budgets, against real Dovecot servers behind a throttling proxy (`helpers/imap_proxy.py`).
Every copy is counted by Message-ID on the target: lost 0, duplicated 0."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_mover_imap import REPO, snapshot, store

from mailferry.mail.imap.client import ImapClient, ImapThrottled, throttle_answer
from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.folders import ATTRIBUTES, VIRTUAL_USES, Folder, map_folders
from reconciler.mover.manifest import Manifest
from reconciler.mover.pace import Backoff, Limits, LocalPace
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.runner import Job, run_jobs_async

from dovecot import Dovecot, DovecotPair, serve_pair
from helpers import mail
from helpers.gmail_server import SPAM, TRASH, GmailServer, Mailbox, Message
from helpers.imap_proxy import ThrottlingProxy

USERS = (*(f"p{i}" for i in range(8)), "cap", "byes", "login", "gm", "c0", "c1", "c2", "c3")
FAST = Backoff(base=0.2, cap=1.0, settle=0.5, recover_every=60.0, window=2.0, min_rate=5.0)


class WatchedPace(LocalPace):
    """A LocalPace that keeps the message rate it had observed at each refusal (what its
    back-off halves)."""

    def __init__(self, system: str, backoff: Backoff) -> None:
        super().__init__(system, backoff=backoff)
        self.seen_at_refusal: list[float] = []

    def throttled(self, reason: str) -> float:
        self.seen_at_refusal.append(self.observed())
        return super().throttled(reason)


@pytest.fixture(scope="module")
def pair() -> Iterator[DovecotPair]:
    yield from serve_pair(USERS)


def messages(user: str, count: int, size: int = 600) -> list[tuple[bytes, str]]:
    return [(mail.message(f"{user} {i}", f"<{user}.{i}@provider.example>",
                          f"body {i} " + "x" * size), "") for i in range(count)]


def fill(server: Dovecot, user: str, folders: dict[str, list[tuple[bytes, str]]]) -> None:
    asyncio.run(mail.imap_fill(server.port, user, f"pw-{user}", folders))


def ids(server: Dovecot, user: str) -> Counter[str]:
    """Message-IDs in the target, with their counts (duplicates show as 2)."""
    return Counter(mail.message_id(k[1]) for k, n in snapshot(server, user).items()
                   for _ in range(n))


def jobs(users: list[str], src_port: int, dst_port: int, dst_pace: LocalPace,
         options: Options) -> list[Job]:
    def job(user: str) -> Job:
        src = ImapAccount("127.0.0.1", src_port, user, f"pw-{user}", timeout=15)
        dst = ImapAccount("127.0.0.1", dst_port, user, f"pw-{user}", timeout=15)
        return Job(user, lambda: ImapEndpoint(src, readonly=True),
                   lambda: ImapEndpoint(dst, pace=dst_pace), options=options)
    return [job(u) for u in users]


def copy(users: list[str], src_port: int, dst_port: int, pace: LocalPace, tmp: Path,
         options: Options | None = None, parallel: int = 8) -> list[MailboxReport]:
    return asyncio.run(run_jobs_async(
        jobs(users, src_port, dst_port, pace, options or Options(batch_messages=5)),
        manifest=Manifest(store(tmp)), parallel=parallel))


def test_throttle_answers_are_recognised() -> None:
    """The answers providers give a client that takes too much, and ones that are not."""
    for text in ("[THROTTLED] Request is throttled", "[LIMIT] Too many", "[UNAVAILABLE] x",
                 "[ALERT] Too many simultaneous connections. (Failure)",
                 "Server Unavailable. 15", "* BYE Too many connections"):
        assert throttle_answer(text), text
    for text in ("[AUTHENTICATIONFAILED] Invalid credentials", "Mailbox doesn't exist",
                 "[TRYCREATE] no such mailbox", "[OVERQUOTA] quota exceeded"):
        assert not throttle_answer(text), text


def test_a_throttling_target_slows_the_mover_down_and_loses_nothing(
        pair: DovecotPair, tmp_path: Path) -> None:
    """Six mailboxes at once into a target whose proxy answers two APPENDs with
    `NO [THROTTLED]` and another with an early `BYE` (each in a different attempt): every
    mailbox completes with each message exactly once, and after the first refusal the
    mover used fewer connections at once and appended at a lower rate (both measured by
    the proxy)."""
    users = [f"p{i}" for i in range(6)]
    for user in users:
        fill(pair.src, user, {"INBOX": messages(user, 400)})
    proxy = ThrottlingProxy(pair.dst.port, refuse={30, 90}, bye={60})
    pace = WatchedPace("dst", backoff=FAST)
    try:
        reports = copy(users, pair.src.port, proxy.port, pace, tmp_path, parallel=6)
    finally:
        proxy.close()
    assert all(r.verified for r in reports), [r.as_dict() for r in reports]
    assert sum(r.throttled for r in reports) == 3, [r.throttled for r in reports]
    for user in users:
        got = ids(pair.dst, user)
        assert len(got) == 400 and set(got.values()) == {1}, (user, got.most_common(2))
    refused = proxy.first("refuse")
    assert refused is not None
    # The copies over the new limit give their connections back at their next message
    # (70 ms here): measured from a second after the refusal.
    before, after = proxy.peak_connections(end=refused), proxy.peak_connections(refused + 1)
    assert before == 6 and after <= 3, (before, after)
    # The pace halves the rate it observed over its window before the refusal (messages
    # taken from the source, which can run ahead of the APPENDs the proxy counts: once in CI
    # the proxy saw 1,140/s before and 905/s after, more than 0.75 of it). So the target's
    # rate after it is under that half (with a bucket's slack), and below its rate before.
    first_append = proxy.first("append")
    assert first_append is not None
    n_before, t_before = proxy.appended(max(first_append, refused - FAST.window), refused)
    n_after, t_after = proxy.appended(refused + 1)  # to the last APPEND
    assert n_before > 20 and n_after > 100, (n_before, n_after)
    rate_before, rate_after = n_before / max(t_before, 0.01), n_after / max(t_after, 0.01)
    halved = pace.seen_at_refusal[0] / 2
    assert rate_after < rate_before and rate_after < 1.2 * halved, (
        rate_before, rate_after, halved)
    assert pace.refusals == 3 and pace.allowed is not None and pace.allowed <= 3


def test_too_many_connections_at_login_is_retried_not_a_login_failure(
        pair: DovecotPair, tmp_path: Path) -> None:
    """A target that allows two connections answers the third login `NO [LIMIT] Too many
    simultaneous connections`: not a refused password (which is never retried) but a
    throttle; the mover goes down to what the server takes and every mailbox completes."""
    users = ["p6", "p7", "login"]
    for user in users:
        fill(pair.src, user, {"INBOX": messages(user, 30)})
    proxy = ThrottlingProxy(pair.dst.port, limit=2)
    pace = LocalPace("dst", backoff=FAST)
    try:
        reports = copy(users, pair.src.port, proxy.port, pace, tmp_path, parallel=3)
    finally:
        proxy.close()
    assert all(r.verified and r.error is None for r in reports), [r.as_dict() for r in reports]
    assert proxy.first("limit") is not None and pace.refusals >= 1
    for user in users:
        got = ids(pair.dst, user)
        assert len(got) == 30 and set(got.values()) == {1}


def test_an_early_bye_is_a_throttle(pair: DovecotPair) -> None:
    """The client turns an unasked-for BYE into `ImapThrottled` naming the server."""
    proxy = ThrottlingProxy(pair.dst.port, bye={1})

    async def go() -> None:
        client = await ImapClient.connect("127.0.0.1", proxy.port, timeout=10)
        await client.login("byes", "pw-byes")
        with pytest.raises(ImapThrottled) as caught:
            await client.simple('APPEND INBOX {5+}\r\nhello')
        assert caught.value.server == ("127.0.0.1", proxy.port)
        client.close()
    try:
        asyncio.run(go())
    finally:
        proxy.close()


def test_connection_limits_per_system_and_per_user() -> None:
    """`connect` waits while the system's or the mailbox's connections are at their limit,
    and goes on when one is given back."""
    async def go() -> None:
        pace = LocalPace("s", Limits(connections=2, per_user=1))
        await pace.connect("a")
        second = asyncio.create_task(pace.connect("a"))  # same user: waits
        await pace.connect("b")
        third = asyncio.create_task(pace.connect("c"))  # the system is full: waits
        await asyncio.sleep(0.05)
        assert not second.done() and not third.done() and pace.active == 2
        assert not pace.pooling
        pace.disconnect("a")
        await asyncio.sleep(0.05)
        assert second.done() != third.done()  # one slot came free: one of them got it
        pace.disconnect("b")
        await asyncio.wait_for(asyncio.gather(second, third), 2)
        assert pace.active == 2
    asyncio.run(go())


def test_back_off_halves_then_recovers_slowly() -> None:
    """A refusal halves the connections in use and the measured rate, once per settle
    period; each quiet `recover_every` gives one connection and 1.5x the rate back, until
    the limits are gone."""
    now = [0.0]

    async def go() -> None:
        pace = LocalPace("s", backoff=Backoff(base=1, cap=8, settle=1, recover_every=10,
                                              window=5, min_rate=1), monotonic=lambda: now[0])
        for _ in range(8):
            await pace.connect("u")
        for i in range(100):
            now[0] = i * 0.01
            await pace.take(10)  # 100 messages in 1 s
        assert 80 < pace.observed() < 120
        assert pace.throttled("x") == 1
        assert pace.allowed == 4 and pace.rate is not None and 40 < pace.rate < 60
        assert pace.throttled("y") == 2  # within the settle period: no further cut
        assert pace.allowed == 4
        now[0] += 1.5
        assert pace.throttled("z") == 4 and pace.allowed == 2
        # the server's own suggestion wins when longer (Exchange Online's text)
        assert pace.throttled("NO [THROTTLED] Suggested Backoff Time: 30000 milliseconds") == 30
        assert pace.throttled("NO [THROTTLED] Suggested Backoff Time: 500 milliseconds") == 8
        for _ in range(8):
            pace.disconnect("u")
        steps = 0
        while pace.allowed is not None and steps < 20:
            now[0] += 10
            await pace.connect("u")
            pace.disconnect("u")
            steps += 1
        assert 5 <= steps <= 7, steps  # 2 -> 8, one per quiet period
    asyncio.run(go())


def test_a_daily_budget_stops_mid_way_and_resumes_the_next_day(
        pair: DovecotPair, tmp_path: Path) -> None:
    """A target allowing 40 KB a day: the first day's copy stops after what fits and says
    until when; the same day again copies nothing; the next day (an injected clock)
    copies the rest; nothing is in the target twice."""
    user = "cap"
    fill(pair.src, user, {"INBOX": messages(user, 60, size=1500),
                          "Archive": messages(user + "a", 20, size=1500)})
    day = [datetime(2026, 12, 4, 15, 0, tzinfo=UTC)]
    pace = LocalPace("dst", Limits(bytes_per_day=40_000), clock=lambda: day[0])
    first = copy([user], pair.src.port, pair.dst.port, pace, tmp_path)[0]
    assert not first.verified and first.resume_at == datetime(2026, 12, 5, tzinfo=UTC)
    assert "daily budget of system dst spent" in (first.error or "")
    stored = ids(pair.dst, user)
    assert 0 < sum(stored.values()) < 80 and set(stored.values()) == {1}
    again = copy([user], pair.src.port, pair.dst.port, pace, tmp_path)[0]
    assert again.resume_at is not None and ids(pair.dst, user) == stored
    for _ in range(10):  # bounded: 80 messages of ~1.7 KB at 40 KB a day
        day[0] += timedelta(days=1)
        report = copy([user], pair.src.port, pair.dst.port, pace, tmp_path)[0]
        if report.verified:
            break
    got = ids(pair.dst, user)
    assert report.verified and len(got) == 80 and set(got.values()) == {1}


def test_gmail_labels_become_folders_and_each_message_leaves_gmail_once(
        pair: DovecotPair, tmp_path: Path) -> None:
    """A server announcing X-GM-EXT-1 (`helpers/gmail_server.py`, real TCP): every message
    is fetched from All Mail exactly once whatever its labels, lands in one target folder
    per label (a second label by a COPY on the target), \\Starred and \\Important make no
    folder, an unlabelled message goes to Archive, Spam and Trash by their attribute to
    Junk and Trash; counted by Message-ID per folder, and a re-run fetches nothing."""
    def msg(n: int, labels: set[str], **kw: object) -> Message:
        body = mail.message(f"gmail {n}", f"<gm{n}@gmail.example>", f"text {n}")
        return Message(body, labels, **kw)  # type: ignore[arg-type]

    box = Mailbox("pw-gm", [
        msg(1, {"\\Inbox", "Work"}), msg(2, {"\\Inbox"}),
        msg(3, {"Work", "Work/Projects", "\\Starred"}), msg(4, {"\\Sent"}), msg(5, set()),
        msg(6, {"\\Inbox", "\\Important", "\\Sent"}), msg(7, set(), where=SPAM),
        msg(8, set(), where=TRASH), msg(9, {"\\Draft"}), msg(10, {"Café"})])
    gmail = GmailServer({"gm": box})
    src = ImapAccount("127.0.0.1", gmail.port, "gm", "pw-gm", timeout=15)
    dst = ImapAccount("127.0.0.1", pair.dst.port, "gm", "pw-gm", timeout=15)
    job = Job("gm", lambda: ImapEndpoint(src, readonly=True), lambda: ImapEndpoint(dst))
    try:
        first = asyncio.run(run_jobs_async([job], manifest=Manifest(store(tmp_path))))[0]
        served = dict(gmail.served)
        again = asyncio.run(run_jobs_async([job], manifest=Manifest(store(tmp_path))))[0]
    finally:
        gmail.close()
    assert first.verified and again.verified, (first.as_dict(), again.as_dict())
    assert served == {m.msgid: 1 for m in box.messages}, served  # once, not once per label
    assert dict(gmail.served) == served and again.copied == 0
    got: dict[str, set[str]] = {}
    flags: dict[str, frozenset[str]] = {}
    for (folder, data, flagset, _), count in snapshot(pair.dst, "gm").items():
        assert count == 1, (folder, data[:80])
        got.setdefault(folder, set()).add(mail.message_id(data))
        flags[mail.message_id(data)] = flagset
    ids = {folder: {f"<gm{n}@gmail.example>" for n in numbers} for folder, numbers in {
        "INBOX": (1, 2, 6), "Work": (1, 3), "Work/Projects": (3,), "Sent": (4, 6),
        "Archive": (5,), "Junk": (7,), "Trash": (8,), "Drafts": (9,), "Café": (10,)}.items()}
    assert got == ids, got
    assert "\\Flagged" in flags["<gm3@gmail.example>"]


def test_provider_folders_are_mapped_by_attribute_not_name() -> None:
    """A provider's nested folders go by their RFC 6154 attribute to the target's folder of
    that use, or its conventional name when the target has none; a top-level folder with
    no same-use target keeps its name (as before)."""
    src = [Folder("[Gmail]/Spam", "[Gmail]/Spam", "\\Junk"),
           Folder("[Gmail]/Bin", "[Gmail]/Bin", "\\Trash"),
           Folder("Boîte/Envoyés", "Boîte/Envoyés", "\\Sent"),
           Folder("Courrier indésirable", "Courrier indésirable", "\\Junk"),
           Folder("Deleted Items", "Deleted Items", "\\Trash")]
    got = map_folders(src[:3], [Folder("Corbeille", "Corbeille", "\\Trash")])
    assert got == {"[Gmail]/Spam": "Junk", "[Gmail]/Bin": "Corbeille", "Boîte/Envoyés": "Sent"}
    assert map_folders(src[3:], []) == {"Courrier indésirable": "Courrier indésirable",
                                        "Deleted Items": "Deleted Items"}
    assert {"\\all", "\\flagged", "\\important"} <= set(ATTRIBUTES)
    assert set(VIRTUAL_USES) == {"\\All", "\\Flagged", "\\Important"}


def test_the_command_line_keeps_to_a_connection_limit(pair: DovecotPair, tmp_path: Path) -> None:
    """`mover copy --parallel 3 --dst-max-connections 1`: three mailboxes, one connection to
    the target at any moment (the proxy counts them), every message once."""
    users = ["p0", "p1", "p2"]  # copied again, into c0..c2
    listing = tmp_path / "users.txt"
    listing.write_text("".join(f"{u} pw-{u} {t} pw-{t}\n"
                               for u, t in zip(users, ("c0", "c1", "c2"), strict=True)))
    for user in users:
        if not ids(pair.src, user):
            fill(pair.src, user, {"INBOX": messages(user, 40)})
    proxy = ThrottlingProxy(pair.dst.port)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "reconciler.mover", "copy", "--src",
             f"127.0.0.1:{pair.src.port}", "--dst", f"127.0.0.1:{proxy.port}", "--users",
             str(listing), "--parallel", "3", "--dst-max-connections", "1",
             "--progress", "none", "--report", "json"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert proxy.peak_connections() == 1 and proxy.first("open") is not None
    for user, target in zip(users, ("c0", "c1", "c2"), strict=True):
        got = ids(pair.dst, target)
        assert got == ids(pair.src, user) and set(got.values()) == {1}


def test_a_busy_source_is_retried_and_slowed_not_failed(pair: DovecotPair, tmp_path: Path) -> None:
    """The source's proxy answers the first EXAMINE of a second connection and a body
    FETCH `NO [UNAVAILABLE]`: neither is taken for a missing folder (which would skip it)
    nor for a failure; the source's pace (not the target's) is told, and the copy
    completes with each message once."""
    user = "c0"
    if not ids(pair.src, user):
        fill(pair.src, user, {"INBOX": messages(user, 30), "Work": messages(user + "w", 20)})
    # EXAMINEs: INBOX, Work (first attempt: refused at the second), ...; UID FETCHes of
    # bodies come after the listings
    proxy = ThrottlingProxy(pair.src.port, commands={"EXAMINE": {2}, "UID FETCH": {4}})
    src_pace, dst_pace = LocalPace("src", backoff=FAST), LocalPace("dst", backoff=FAST)
    account = ImapAccount("127.0.0.1", proxy.port, user, f"pw-{user}", timeout=15)
    target = ImapAccount("127.0.0.1", pair.dst.port, "c3", "pw-c3", timeout=15)
    job = Job(user, lambda: ImapEndpoint(account, readonly=True, pace=src_pace),
              lambda: ImapEndpoint(target, pace=dst_pace))
    try:
        report = asyncio.run(run_jobs_async([job], manifest=Manifest(store(tmp_path))))[0]
    finally:
        proxy.close()
    assert report.verified and report.throttled == 2, report.as_dict()
    assert src_pace.refusals == 2 and dst_pace.refusals == 0
    assert sum(1 for _, k, _ in proxy.events if k == "unavailable") == 2
    got = ids(pair.dst, "c3")
    assert got == ids(pair.src, user) and set(got.values()) == {1}


def test_a_system_that_never_stops_refusing_is_left_for_later(
        pair: DovecotPair, tmp_path: Path) -> None:
    """Every APPEND refused: after its throttled attempts the copy stops with "throttled"
    and the pause its pace asks for (the step raises `Throttled` with it), nothing stored,
    nothing counted as a failed message."""
    user = "c2"
    if not ids(pair.src, user):
        fill(pair.src, user, {"INBOX": messages(user, 10)})
    proxy = ThrottlingProxy(pair.dst.port, max_rate=0)
    pace = LocalPace("dst", backoff=FAST)
    src = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
    dst = ImapAccount("127.0.0.1", proxy.port, "c3", "pw-c3", timeout=15)
    job = Job(user, lambda: ImapEndpoint(src, readonly=True), lambda: ImapEndpoint(dst, pace=pace))
    before = ids(pair.dst, "c3")
    try:
        report = asyncio.run(run_jobs_async([job], throttled_retries=2))[0]
    finally:
        proxy.close()
    assert not report.verified and report.throttled == 3 and report.failed == 0
    assert (report.error or "").startswith("throttled: dst:") and report.retry_in == 0.8
    assert ids(pair.dst, "c3") == before
