"""fed nodes woken by PostgreSQL LISTEN/NOTIFY (fed/routing/notify.py, docs/fed-multinode.md).

Real `python -m fed serve` nodes on a private PostgreSQL. To test the mechanism and not the
poll, the nodes run with every poll at 60 s and a 240 s lease (a round every 60 s): a
change can then reach another node within seconds only through a notice. What must hold: a
flip and a hold through one node reach the others (and the hold's acknowledgements come
back) well inside the poll; a listener whose connection is killed (pg_terminate_backend)
while the database refuses connections misses the notice of a change made meanwhile, and
catches it when it is back, by the re-read that follows every LISTEN; SQLite and
`--no-node-notify` poll, and say so.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_fed_nodes import api, start_node

from fedutil import FakeSystem, Fed, message, send
from helpers.waiting import wait_for
from pgutil import PrivatePostgres

pytestmark = pytest.mark.timeout(180)

AD1, ALIAS = "jean.dupont@corp.example", "jd@corp.example"
SLOW = ("--node-poll", "60", "--node-safety-poll", "60")  # the poll cannot be what works
LEASE = 240.0  # a round every 60 s


def wakeup(fed: Fed) -> dict[str, Any]:
    """The node's own account of its listener: in the 200, or in the 503 it answers while
    the shared database takes no new connection (the pool may need one)."""
    status, data = api(fed, "GET", "/v1/nodes")
    assert status == 200 or (status == 503 and "shared database unreachable" in
                             data["error"]), data
    woken: dict[str, Any] = data["wakeup"]
    return woken


def listening(fed: Fed, listens: int = 1) -> bool:
    woken = wakeup(fed)
    return bool(woken["in_use"] == "notify" and woken["listens"] >= listens)


def routes(fed: Fed, address: str, physical: str) -> bool:
    return fed.client.lookup(address) == physical


def admin(postgres: PrivatePostgres) -> psycopg.Connection[Any]:
    """A superuser connection to the `postgres` database (not the one the nodes use)."""
    return psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres",
                           dbname="postgres", autocommit=True)


def test_flip_and_hold_reach_every_node_by_notice_not_by_poll(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    nodes = [start_node(tmp_path, name, shared_url, [s1, s2], lease=LEASE,
                        extra=(*SLOW, "--hold-timeout", "20")) for name in ("a", "b", "c")]
    a, b, c = nodes
    try:
        for fed in nodes:
            wait_for(partial(listening, fed), what=f"{fed.state_dir.name} listening")
        assert wakeup(a)["mode"] == "notify" and wakeup(a)["safety_poll"] == 60.0
        for address in (AD1, ALIAS):
            a.client.put_entry(address, s1.physical("jean"))
        for fed in (b, c):  # 60 s poll, 60 s rounds: only a notice brings it this soon
            wait_for(partial(routes, fed, ALIAS, s1.physical("jean")), timeout=10,
                     what="the entry on the other nodes")

        # The hold through b returns only once a and c acknowledged: their notices wake
        # b's hold call (it would otherwise look again after its 60 s safety poll and
        # answer 503 after the 20 s hold timeout).
        held = b.client.hold([AD1])
        assert held.held == [AD1]
        for fed in (a, c):
            assert set(fed.client.holds()[AD1].covers) == {AD1, ALIAS, s1.physical("jean")}
        code, _ = send(c.smtp_port, [ALIAS], message("held", "<n1@t>"))
        assert code == 250
        wait_for(lambda: c.client.queue().held == 1, timeout=10, what="the message held on c")

        a.client.flip([AD1, ALIAS], s1.physical("jean"), s2.physical("jean"))
        for fed in (b, c):
            wait_for(partial(routes, fed, AD1, s2.physical("jean")), timeout=10,
                     what="the flip on the other nodes")
        a.client.release([AD1])  # c delivers its held message on a's notice
        wait_for(lambda: s2.ids() == ["<n1@t>"], timeout=10, what="the held message at s2")
        assert s1.ids() == []
        assert wakeup(c)["listens"] == 1 and wakeup(c)["notices"] > 0
    finally:
        for fed in nodes:
            fed.kill()


def test_a_killed_listener_rereads_and_catches_the_change_it_missed(
        tmp_path: Path, shared_url: str, postgres: PrivatePostgres,
        systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2], lease=LEASE, extra=SLOW)
    b = start_node(tmp_path, "b", shared_url, [s1, s2], lease=LEASE, extra=SLOW)
    blocked = False
    try:
        a.client.put_entry(AD1, s1.physical("jean"))
        wait_for(lambda: listening(b) and b.client.lookup(AD1) == s1.physical("jean"),
                 what="b listening, with the entry")
        with admin(postgres) as db:
            # New connections are refused (the nodes' pooled ones stay): b's listener
            # cannot come back before the change below is committed and announced.
            db.execute("ALTER DATABASE mailferry WITH ALLOW_CONNECTIONS false")
            blocked = True
            killed = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = 'fed-notify b'").fetchall()
            assert killed == [(True,)]
            wait_for(lambda: not wakeup(b)["listening"], what="b's listener down")
            down = wakeup(b)
            assert down["in_use"] == "poll" and down["last_error"]

            a.client.flip([AD1], s1.physical("jean"), s2.physical("jean"))
            # b missed the notice and polls every 60 s: it still routes to s1.
            assert b.client.lookup(AD1) == s1.physical("jean")

            db.execute("ALTER DATABASE mailferry WITH ALLOW_CONNECTIONS true")
            blocked = False
        wait_for(lambda: listening(b, listens=2), timeout=15, what="b listening again")
        wait_for(lambda: b.client.lookup(AD1) == s2.physical("jean"), timeout=5,
                 what="the missed flip on b after its re-read")
        assert "listening for shared-database notices again" in b.log()
        # And it listens for real again: the next change arrives by notice.
        a.client.put_entry(ALIAS, s2.physical("jean"))
        wait_for(lambda: b.client.lookup(ALIAS) == s2.physical("jean"), timeout=10,
                 what="a change after the reconnect")
    finally:
        if blocked:
            with admin(postgres) as db:
                db.execute("ALTER DATABASE mailferry WITH ALLOW_CONNECTIONS true")
        a.kill()
        b.kill()


def test_nodes_view_answers_503_with_its_own_wakeup_while_the_database_refuses(
        tmp_path: Path, shared_url: str, postgres: PrivatePostgres,
        systems: tuple[FakeSystem, FakeSystem]) -> None:
    """Every backend of the nodes' database cut and no new connection allowed: GET
    /v1/nodes says the shared database is unreachable (503, JSON, the driver's reason),
    with the node's own account of its listener; back to 200 once it takes connections."""
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2], lease=LEASE, extra=SLOW)
    blocked = False
    try:
        wait_for(lambda: listening(a), what="a listening")
        with admin(postgres) as db:
            db.execute("ALTER DATABASE mailferry WITH ALLOW_CONNECTIONS false")
            blocked = True
            db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = 'mailferry' AND pid <> pg_backend_pid()")
            def refused() -> dict[str, Any] | None:
                status, answer = api(a, "GET", "/v1/nodes")
                return answer if status == 503 else None

            data = wait_for(refused, what="a 503 from /v1/nodes")
            assert "shared database unreachable" in data["error"]
            assert "not currently accepting connections" in data["error"]
            assert data["self"] and "mode" in data["wakeup"]
            db.execute("ALTER DATABASE mailferry WITH ALLOW_CONNECTIONS true")
            blocked = False
        wait_for(lambda: api(a, "GET", "/v1/nodes")[0] == 200, what="200 again")
    finally:
        if blocked:
            with admin(postgres) as db:
                db.execute("ALTER DATABASE mailferry WITH ALLOW_CONNECTIONS true")
        a.kill()


def test_sqlite_and_no_node_notify_poll_and_say_so(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    alone = Fed(tmp_path / "alone", [s1, s2]).start()  # the default SQLite shared DB
    a = start_node(tmp_path, "a", shared_url, [s1, s2])
    b = start_node(tmp_path, "b", shared_url, [s1, s2], extra=("--no-node-notify",))
    try:
        assert wakeup(alone) == {"mode": "poll", "in_use": "poll", "poll": 0.1,
                                 "safety_poll": 5.0, "why": "sqlite has no LISTEN/NOTIFY"}
        assert wakeup(b)["why"] == "--no-node-notify" and wakeup(b)["in_use"] == "poll"
        wait_for(lambda: listening(a), what="a listening")
        # A mixed pair works: b's 100 ms poll sees a's change, a's notice b's change.
        a.client.put_entry(AD1, s1.physical("jean"))
        wait_for(lambda: b.client.lookup(AD1) == s1.physical("jean"), what="a's entry on b")
        b.client.put_entry(ALIAS, s1.physical("jean"))
        wait_for(lambda: a.client.lookup(ALIAS) == s1.physical("jean"), what="b's entry on a")
        assert b.client.hold([AD1]).held == [AD1]
    finally:
        for fed in (alone, a, b):
            fed.kill()
