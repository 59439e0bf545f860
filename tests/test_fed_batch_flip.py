"""The batch flip (``POST /v1/flips``) against a real fed: the hold's guarantees kept while
mail keeps arriving, a malformed batch changes nothing, a fenced batch is refused."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import LeaseLost, PermanentError
from reconciler.fedclient import FedClient

from fedutil import TOKEN, FakeSystem, Fed, message, send
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

USERS = [f"user{n}@corp.example" for n in range(40)]


@pytest.fixture
def fed(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> Iterator[Fed]:
    s1, _ = systems
    running = Fed(tmp_path / "fed", list(systems)).start()
    for n, address in enumerate(USERS):
        running.client.put_entry(address, s1.physical(f"u{n}"))
    yield running
    running.kill()


def _flips(s1: FakeSystem, s2: FakeSystem) -> list[tuple[list[str], str, str]]:
    return [([a], s1.physical(f"u{n}"), s2.physical(f"u{n}")) for n, a in enumerate(USERS)]


def test_mail_held_during_a_batch_flip_reaches_the_new_mailboxes_once(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    fed.client.hold(USERS)
    acked: dict[str, str] = {}  # Message-ID -> the address it was sent to (250 only)
    stop = threading.Event()

    def sender() -> None:  # bounded in count and time
        deadline = time.monotonic() + 60
        for n in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                return
            address = USERS[n % len(USERS)]
            msgid = f"<load{n}@t>"
            if send(fed.smtp_port, [address], message("load", msgid.strip("<>")))[0] == 250:
                acked[msgid] = address

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        wait_for(lambda: len(acked) >= 20, what="20 messages acknowledged under the hold")
        results = fed.client.flip_many(_flips(s1, s2))  # while the sender keeps sending
        assert [r.flipped for r in results] == [[a] for a in USERS]
        after_flip = len(acked)
        wait_for(lambda: len(acked) >= after_flip + 20, what="20 more after the flip")
        assert s1.received == [] and s2.received == []  # the hold holds across the flip
        released = fed.client.release(USERS)
        assert sorted(released.released) == sorted(USERS)
    finally:
        stop.set()
        thread.join(70)
    wait_for(lambda: set(acked) <= set(s2.ids()), timeout=60, what="every message at s2")
    wait_for(lambda: fed.client.queue().pending == 0, what="an empty queue")
    ids = s2.ids()
    assert sorted(ids) == sorted(acked), "each acknowledged message exactly once"
    assert s1.received == []  # nothing reached the old mailboxes
    for received in s2.received:  # each at the new mailbox of the address it was sent to
        n = USERS.index(acked[received.message_id])
        assert received.rcpts == [s2.physical(f"u{n}")]


def _raw(fed: Fed, body: Any, fence: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST /v1/flips with a body the client would never build; (status, answer)."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    if fence is not None:
        headers["Mailferry-Fence"] = fence
    conn = http.client.HTTPConnection("127.0.0.1", fed.control_port, timeout=20)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/v1/flips", body=raw, headers=headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def test_a_malformed_batch_changes_nothing_and_releases_nothing(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    fed.client.hold(USERS[:2])
    assert send(fed.smtp_port, [USERS[0]], message("held", "m0@t"))[0] == 250
    wait_for(lambda: fed.client.queue().parked == 1, what="the message parked")
    before = fed.client.directory()
    good = {"addresses": [USERS[0]], "from": s1.physical("u0"), "to": s2.physical("u0")}
    malformed: list[Any] = [
        b"{not json",
        {},
        {"flips": []},
        {"flips": "everything"},
        {"flips": [good] * 10_001},  # more than one batch may carry
        {"flips": [good, "user1@corp.example"]},  # the second is not an object
        {"flips": [good, {"addresses": [USERS[1]], "from": s1.physical("u1")}]},  # no "to"
        {"flips": [good, {"addresses": [USERS[1]], "from": s1.physical("u1"),
                          "to": "not a physical address"}]},
        {"flips": [good, {"addresses": "user1@corp.example", "from": s1.physical("u1"),
                          "to": s2.physical("u1")}]},  # addresses must be a list
        {"flips": [good, {"addresses": [USERS[0]], "from": s1.physical("u0"),
                          "to": s2.physical("x")}]},  # one address in two flips
    ]
    for body in malformed:
        status, answer = _raw(fed, body)
        assert status == 400, (body if not isinstance(body, dict) else list(body), answer)
        assert answer["error"]
    # A well-formed batch with one conflicting flip (409) changes nothing either.
    status, answer = _raw(fed, {"flips": [good, {"addresses": [USERS[1]],
                                                 "from": s1.physical("other"),
                                                 "to": s2.physical("u1")}]})
    assert status == 409 and "neither" in answer["error"]
    after = fed.client.directory()
    assert after.entries == before.entries and after.version == before.version
    assert sorted(fed.client.holds()) == sorted(USERS[:2])
    assert fed.client.queue().parked == 1 and s1.received == [] and s2.received == []
    # The same flip, well formed, goes through and is idempotent.
    assert fed.client.flip_many([([USERS[0]], s1.physical("u0"), s2.physical("u0"))]
                                )[0].flipped == [USERS[0]]
    assert fed.client.flip_many([([USERS[0]], s1.physical("u0"), s2.physical("u0"))]
                                )[0].already == [USERS[0]]
    fed.client.release(USERS[:2])
    wait_for(lambda: s2.ids() == ["<m0@t>"], what="the held message at the new mailbox")
    assert s1.received == []


def test_a_fenced_batch_is_refused_and_changes_nothing(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    newer = FedClient(f"http://127.0.0.1:{fed.control_port}", TOKEN, timeout=20)
    newer.fence = ("store-1", 8)
    newer.hold(USERS)  # the newer holder has called: 8 is the bar now
    before = fed.client.directory()
    older = FedClient(f"http://127.0.0.1:{fed.control_port}", TOKEN, timeout=20)
    older.fence = ("store-1", 7)
    with pytest.raises(LeaseLost, match="fencing token 7 is older than 8"):
        older.flip_many(_flips(s1, s2))
    status, answer = _raw(fed, {"flips": [{"addresses": [USERS[0]], "from": s1.physical("u0"),
                                           "to": s2.physical("u0")}]}, fence="store-1/7")
    assert status == 409 and answer["fenced"] is True and answer["current"] == 8
    status, answer = _raw(fed, {"flips": [{"addresses": [USERS[0]], "from": s1.physical("u0"),
                                           "to": s2.physical("u0")}]}, fence="7")
    assert status == 400  # a fence without its lease id
    after = fed.client.directory()
    assert after.entries == before.entries and after.version == before.version
    results = newer.flip_many(_flips(s1, s2))  # the current holder's batch goes through
    assert [r.flipped for r in results] == [[a] for a in USERS]
    with pytest.raises(PermanentError):  # and a malformed one from it is still a 400
        newer.flip_many([])
