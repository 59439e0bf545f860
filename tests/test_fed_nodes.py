"""Several fed nodes sharing their directory and holds (docs/fed-multinode.md).

Two `python -m fed serve` processes, each with its own spool, share a private PostgreSQL;
the mail systems are real aiosmtpd servers on loopback. What must hold: after a hold call
returns on one node, no node delivers for the held addresses (a paused node included);
after the flip and the release, every held message from both nodes reaches the new
mailbox, in arrival order per node, once. Single-node behaviour of holds (aliases, E8
check, partial holds, age) is checked on the default SQLite shared database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from fed.routing.nodes import NodeRegistry, NodeState, blocking
from fed.routing.shared_db import SharedDB
from reconciler.errors import PermanentError

from fedutil import TOKEN, FakeSystem, Fed, message, send
from helpers import mail
from helpers.waiting import wait_for
from pgutil import PrivatePostgres, pg_bindir

pytestmark = pytest.mark.timeout(180)

AD1, ALIAS, ALIAS2 = "jean.dupont@corp.example", "jd@corp.example", "jean@corp.example"
OTHER = "colleague@corp.example"


# -- the pure decision ----------------------------------------------------------------------
def node(name: str, beat: float, idle_for: int, dead_after: float = 10.0) -> NodeState:
    return NodeState(name, beat, dead_after, idle_for, idle_for, 0.0, "")


def test_blocking_waits_for_live_nodes_that_have_not_acknowledged() -> None:
    nodes = [node("a", 100.0, 7), node("b", 99.0, 6), node("c", 80.0, 2), node("d", 95.0, 9)]
    # c is silent for 20 s > its 10 s: harmless; b is alive and behind; a and d are idle.
    assert blocking(nodes, 7, now=100.0) == ["b"]
    assert blocking(nodes, 6, now=100.0) == []
    assert blocking(nodes, 8, now=100.0) == ["a", "b"]
    assert blocking([node("b", 99.0, 6, dead_after=0.5)], 7, now=100.0) == []


def test_a_shared_db_from_before_the_control_column_gets_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    old = create_engine(url)
    with old.begin() as db:  # the nodes table as the first release created it
        db.exec_driver_sql(
            "CREATE TABLE nodes (name VARCHAR(255) PRIMARY KEY, heartbeat_at FLOAT NOT NULL, "
            "dead_after FLOAT NOT NULL, holds_seen BIGINT NOT NULL, idle_for BIGINT NOT NULL, "
            "started_at FLOAT NOT NULL, info VARCHAR(1000) NOT NULL)")
        db.exec_driver_sql("INSERT INTO nodes VALUES ('old', 1.0, 10.0, 3, 3, 0.0, 'h:/x')")
    old.dispose()
    shared = SharedDB(url)
    registry = NodeRegistry(shared)
    registry.heartbeat("new", 0, 0, 10.0, 0.0, "h:/y")
    registry.set_control("new", "127.0.0.1:8026")
    _, states = registry.states()
    assert [(n.name, n.control, n.idle_for) for n in states] == [
        ("new", "127.0.0.1:8026", 0), ("old", None, 3)]
    SharedDB(url).close()  # a second start finds the column: nothing to add
    shared.close()


# -- helpers -----------------------------------------------------------------------------------
def start_node(tmp_path: Path, name: str, url: str, systems: list[FakeSystem],
               lease: float = 2.0, extra: tuple[str, ...] = ()) -> Fed:
    return Fed(tmp_path / name, systems, extra=[
        "--shared-db", url, "--node-name", name, "--node-lease", str(lease),
        "--delivery-timeout", "3", *extra]).start()


def api(fed: Fed, method: str, path: str, body: dict[str, Any] | None = None
        ) -> tuple[int, Any]:
    """A raw control API call: (status, JSON)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{fed.control_port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def nodes_of(fed: Fed) -> dict[str, dict[str, Any]]:
    status, data = api(fed, "GET", "/v1/nodes")
    assert status == 200, data
    return {n["name"]: {**n, "version": data["holds_version"]} for n in data["nodes"]}


def acknowledged(fed: Fed, name: str) -> bool:
    """Has node `name` loaded the current holds version with nothing held in flight?"""
    row = nodes_of(fed).get(name)
    return bool(row and row["alive"] and row["idle_for"] >= row["version"])


def flow(fed: Fed, prefix: str) -> mail.Sender:
    """Mail to one node, alternating AD1's alias and AD1, until finished (at most 2000)."""
    return mail.Sender(fed.smtp_port, [ALIAS, AD1], tag=f"{prefix}-", count=2000, pause=0.01,
                       seconds=150)


def more_than(sender: mail.Sender, count: int) -> bool:
    return len(sender.acked_ids) > count


# -- two nodes ---------------------------------------------------------------------------------
def test_hold_on_one_node_stops_both_and_release_on_the_other_delivers_all_once(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2])
    b = start_node(tmp_path, "b", shared_url, [s1, s2])
    try:
        for address in (AD1, ALIAS):
            a.client.put_entry(address, s1.physical("jean"))
        # The directory written through a is what b routes with.
        wait_for(lambda: b.client.lookup(ALIAS) == s1.physical("jean"), what="entry on b")
        senders = [flow(a, "a"), flow(b, "b")]
        for sender in senders:
            sender.start()
        wait_for(lambda: {m.message_id[1] for m in s1.received} == {"a", "b"}, timeout=30,
                 what="mail from both nodes at s1")

        held = a.client.hold([AD1])  # the alias is covered without being named
        at_hold = len(s1.received)
        assert held.held == [AD1]
        holds_on_b = b.client.holds()
        assert set(holds_on_b[AD1].covers) == {AD1, ALIAS, s1.physical("jean")}
        assert acknowledged(a, "b") and acknowledged(a, "a")

        counts = [len(s.acked_ids) for s in senders]
        for sender, count in zip(senders, counts, strict=True):
            wait_for(partial(more_than, sender, count + 10), timeout=30,
                     what="mail accepted during the hold")
        assert len(s1.received) == at_hold
        flipped = a.client.flip([AD1, ALIAS], s1.physical("jean"), s2.physical("jean"))
        assert sorted(flipped.flipped) == [ALIAS, AD1]
        counts = [len(s.acked_ids) for s in senders]
        for sender, count in zip(senders, counts, strict=True):
            wait_for(partial(more_than, sender, count + 5), timeout=30,
                     what="mail accepted after the flip")
        acked = {prefix: s.finish() for prefix, s in zip("ab", senders, strict=True)}
        assert not [r for s in senders for r in s.refused]
        assert len(s1.received) == at_hold and s2.received == []
        held_now = a.client.queue().held + b.client.queue().held
        assert held_now == len(acked["a"]) + len(acked["b"]) - at_hold

        assert b.client.release([AD1]).released == [AD1]
        total = len(acked["a"]) + len(acked["b"])
        wait_for(lambda: len(s1.received) + len(s2.received) >= total, timeout=60,
                 what="every acknowledged message delivered")
        wait_for(lambda: a.client.queue().pending == 0 and b.client.queue().pending == 0,
                 what="empty queues")

        at_s1, at_s2 = s1.ids(), s2.ids()
        assert len(at_s1) == at_hold  # nothing reached the old system after the hold
        assert len(at_s1) + len(at_s2) == total == len(set(at_s1) | set(at_s2))
        assert set(at_s1) | set(at_s2) == set(acked["a"]) | set(acked["b"])
        assert {r for m in s2.received for r in m.rcpts} == {s2.physical("jean")}
        for prefix, sent in acked.items():
            released = [i for i in at_s2 if i.startswith(f"<{prefix}-")]
            assert released, f"no held mail of node {prefix} reached s2"
            assert released == [i for i in sent if i in set(at_s2)], f"order of node {prefix}"
    finally:
        a.kill()
        b.kill()


def test_a_batch_of_flips_through_one_node_routes_the_other_on_postgresql(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2])
    b = start_node(tmp_path, "b", shared_url, [s1, s2])
    try:
        users = [f"user{n}@corp.example" for n in range(300)]  # more than one IN (...) chunk
        for n, address in enumerate(users):
            a.client.put_entry(address, s1.physical(f"u{n}"))
        wait_for(lambda: b.client.lookup(users[-1]) == s1.physical("u299"), what="b's copy")
        a.client.hold(users)
        for n in (0, 150, 299):
            assert send(b.smtp_port, [users[n]], message("held", f"p{n}@t"))[0] == 250
        a.client.put_entry(OTHER, s1.physical("colleague"))
        with pytest.raises(PermanentError, match="neither"):  # one bad flip: none applied
            a.client.flip_many([([u], s1.physical(f"u{n}"), s2.physical(f"u{n}"))
                                for n, u in enumerate(users)]
                               + [([OTHER], s1.physical("x"), s2.physical("y"))])
        assert b.client.lookup(users[0]) == s1.physical("u0")
        results = a.client.flip_many([([u], s1.physical(f"u{n}"), s2.physical(f"u{n}"))
                                      for n, u in enumerate(users)])
        assert [r.flipped for r in results] == [[u] for u in users]
        b.client.release(users)  # b must route the held mail by a's flips
        wait_for(lambda: len(s2.received) == 3, what="held mail at s2")
        assert sorted(s2.ids()) == ["<p0@t>", "<p150@t>", "<p299@t>"]
        assert {r for m in s2.received for r in m.rcpts} == {
            s2.physical("u0"), s2.physical("u150"), s2.physical("u299")}
        assert s1.received == []
    finally:
        a.kill()
        b.kill()


def test_a_paused_node_is_fenced_and_a_killed_one_honours_the_hold_on_restart(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2])
    # b retries every 5 s: paused right after a deferral, it is surely between deliveries.
    b = start_node(tmp_path, "b", shared_url, [s1, s2], lease=4.0,
                   extra=("--retry-base", "5", "--retry-max", "5"))
    try:
        a.client.put_entry(AD1, s1.physical("jean"))
        wait_for(lambda: b.client.lookup(AD1) == s1.physical("jean"), what="entry on b")
        # b holds mail for AD1 that s1 defers, so b will try again whenever it may.
        s1.reply = "451 4.3.0 try later"
        assert send(b.smtp_port, [AD1], message("queued on b", "qb@t"))[0] == 250
        wait_for(lambda: any(d.result == "deferred" for d in b.client.deliveries(rcpt=AD1)),
                 what="a deferral on b")
        assert b.proc is not None
        os.kill(b.proc.pid, signal.SIGSTOP)  # paused: heartbeats stop, its view ages
        s1.reply = "250 2.0.0 Ok"

        result: dict[str, Any] = {}
        holder = threading.Thread(target=lambda: result.update(
            hold=api(a, "POST", "/v1/holds", {"addresses": [AD1]})), daemon=True)
        holder.start()
        # The hold waits for b: alive by its last heartbeat, not acknowledged.
        row = wait_for(lambda: (r := nodes_of(a)["b"])["idle_for"] < r["version"] and r,
                       what="the hold written")
        assert row["alive"] and holder.is_alive()
        holder.join(60)  # b's lease runs out: the hold proceeds without it
        assert result["hold"][0] == 200, result
        assert not nodes_of(a)["b"]["alive"]
        at_hold = len(s1.received)

        os.kill(b.proc.pid, signal.SIGCONT)  # wakes with a stale view: fencing
        wait_for(lambda: acknowledged(a, "b"), timeout=30, what="b loads the hold")
        assert AD1 in b.client.holds()
        assert len(s1.received) == at_hold == 0

        b.kill()  # kill -9 during the hold
        b.start()  # same spool, same name: loads the holds before delivering anything
        assert AD1 in b.client.holds() and b.client.queue().held == 1
        wait_for(lambda: acknowledged(a, "b"), timeout=30, what="b back and acknowledging")
        assert len(s1.received) == 0

        b.client.flip([AD1], s1.physical("jean"), s2.physical("jean"))
        assert a.client.release([AD1]).released == [AD1]
        wait_for(lambda: s2.ids() == ["<qb@t>"], timeout=30, what="held mail at s2")
        assert s1.received == []
    finally:
        if b.proc is not None and b.proc.poll() is None:
            os.kill(b.proc.pid, signal.SIGCONT)
        a.kill()
        b.kill()


def test_a_node_killed_while_a_hold_waits_for_it_lets_the_hold_proceed_by_its_lease(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2])
    b = start_node(tmp_path, "b", shared_url, [s1, s2])
    try:
        a.client.put_entry(AD1, s1.physical("jean"))
        wait_for(lambda: b.client.lookup(AD1) == s1.physical("jean"), what="entry on b")
        s1.delay = 3.0  # b's delivery is in flight while the hold is asked for
        assert send(b.smtp_port, [AD1], message("in flight on b", "fb@t"))[0] == 250
        assert s1.data_started.wait(20)
        result: dict[str, Any] = {}
        holder = threading.Thread(target=lambda: result.update(
            hold=api(a, "POST", "/v1/holds", {"addresses": [AD1]})), daemon=True)
        holder.start()
        wait_for(lambda: (r := nodes_of(a)["b"])["idle_for"] < r["version"], what="hold written")
        assert holder.is_alive()  # waiting for b's delivery
        b.kill()  # kill -9 with the delivery in flight
        s1.stop()  # the orphaned transaction dies with its server: it delivers nothing
        holder.join(60)
        assert result["hold"][0] == 200, result  # b's lease ran out
        s1.delay = 0.0
        s1.start()  # on a new port, as the reconciler would tell fed
        a.client.put_system("s1", "127.0.0.1", s1.port, "lmtp")

        b.start()  # its unacknowledged message is still queued, and held
        assert b.client.queue().held == 1
        wait_for(lambda: acknowledged(a, "b"), timeout=30, what="b back and acknowledging")
        assert s1.received == []
        a.client.release([AD1])
        wait_for(lambda: s1.ids() == ["<fb@t>"], timeout=30, what="delivery after release")
    finally:
        a.kill()
        b.kill()


def test_node_names_are_unique_and_a_clean_stop_does_not_delay_holds(
        tmp_path: Path, shared_url: str, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    a = start_node(tmp_path, "a", shared_url, [s1, s2], lease=30.0)
    b = start_node(tmp_path, "b", shared_url, [s1, s2], lease=30.0)
    try:
        assert nodes_of(a)["b"]["alive"]
        # Another spool under a live node's name would acknowledge holds for it: refused.
        with pytest.raises(AssertionError, match="did not get ready"):
            start_node(tmp_path, "b-twin", shared_url, [s1, s2], extra=("--node-name", "b"))
        assert "used by a live node" in (tmp_path / "b-twin.log").read_text()
        assert b.stop() == 0
        assert not nodes_of(a)["b"]["alive"]  # it said goodbye: no lease to wait out
        a.client.put_entry(AD1, s1.physical("jean"))
        assert a.client.hold([AD1]).held == [AD1]
    finally:
        a.kill()
        b.kill()


def restart_postgres(pg: PrivatePostgres) -> None:
    """Start the postmaster again on the same data folder and port."""
    with open(pg.root / "postgres.log", "ab") as log:
        pg.process = subprocess.Popen(
            pg._as_postgres([str(pg_bindir() / "postgres"), "-D", str(pg.data), "-p",
                             str(pg.port), "-h", "127.0.0.1", "-k", str(pg.root),
                             "-c", "fsync=off"]), stdout=subprocess.DEVNULL, stderr=log)
    wait_for(lambda: subprocess.run([str(pg_bindir() / "pg_isready"), "-h", "127.0.0.1",
                                     "-p", str(pg.port)], capture_output=True,
                                    timeout=10).returncode == 0, timeout=30,
             what="PostgreSQL back")


def test_without_its_database_a_node_accepts_mail_and_delivers_only_once_it_is_back(
        tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    pg = PrivatePostgres().start()  # its own server: this test stops it
    a = start_node(tmp_path, "a", pg.url, [s1, s2])
    try:
        a.client.put_entry(AD1, s1.physical("jean"))
        assert send(a.smtp_port, [AD1], message("before", "before@t"))[0] == 250
        wait_for(lambda: s1.ids() == ["<before@t>"], what="delivery with the database up")
        assert pg.process is not None
        # Fast shutdown (clients disconnected): the shared database is gone.
        subprocess.run(pg._as_postgres([str(pg_bindir() / "pg_ctl"), "stop", "-D",
                                        str(pg.data), "-m", "fast"]),
                       check=True, capture_output=True, timeout=60)
        pg.process.wait(30)
        wait_for(lambda: "view older than the lease" in a.log(), timeout=30, what="fencing")
        assert send(a.smtp_port, [AD1], message("during", "during@t"))[0] == 250
        # The decision, observed: the fenced node parked it (else it would be delivered).
        wait_for(lambda: a.client.queue().parked == 1, what="the message parked")
        assert s1.ids() == ["<before@t>"]
        restart_postgres(pg)
        wait_for(lambda: s1.ids() == ["<before@t>", "<during@t>"], timeout=30,
                 what="delivery once the database is back")
        assert "deliveries resume" in a.log()
    finally:
        a.kill()
        pg.stop()


# -- holds on one node (default SQLite shared database) ----------------------------------
@pytest.fixture
def fed(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> Iterator[Fed]:
    s1, _ = systems
    running = Fed(tmp_path / "fed", list(systems)).start()
    for address in (AD1, ALIAS):
        running.client.put_entry(address, s1.physical("jean"))
    running.client.put_entry(OTHER, s1.physical("colleague"))
    yield running
    running.kill()


def test_a_hold_covers_the_aliases_even_those_added_during_the_hold(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    assert (fed.state_dir / "shared.db").exists()
    fed.client.hold([AD1])
    fed.client.put_entry(ALIAS2, s1.physical("jean"))  # a new alias of the held mailbox
    for n, rcpt in enumerate([ALIAS, ALIAS2, s1.physical("jean"), OTHER]):
        assert send(fed.smtp_port, [rcpt], message("cover", f"c{n}@t"))[0] == 250
    wait_for(lambda: s1.ids() == ["<c3@t>"], what="the unrelated mailbox served")
    holds = fed.client.holds()
    assert list(holds) == [AD1]
    assert set(holds[AD1].covers) == {AD1, ALIAS, s1.physical("jean")}
    assert holds[AD1].age_seconds >= 0
    assert fed.client.release([ALIAS]).not_held == [ALIAS]  # only covered: stays held
    assert fed.client.queue().pending == 3
    status, data = api(fed, "POST", "/v1/release", {"addresses": [AD1]})
    assert status == 200 and data["released"] == [AD1]
    assert data["held_seconds"][AD1] >= holds[AD1].age_seconds  # it lasted until now
    wait_for(lambda: fed.client.queue().pending == 0, what="release")
    assert s1.ids()[1:] == ["<c0@t>", "<c1@t>", "<c2@t>"]  # arrival order


def test_one_held_and_one_free_recipient(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    fed.client.hold([AD1])
    assert send(fed.smtp_port, [AD1, OTHER], message("both", "both@t"))[0] == 250
    wait_for(lambda: s1.ids() == ["<both@t>"], what="the free recipient served now")
    assert s1.received[0].rcpts == [s1.physical("colleague")]
    assert fed.client.queue().held == 1
    fed.client.release([AD1])
    wait_for(lambda: len(s1.received) == 2, what="the held recipient after release")
    assert s1.received[1].rcpts == [s1.physical("jean")]


def test_hold_with_require_upsync_refuses_until_the_target_lists_every_address(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    _, s2 = systems
    body = {"addresses": [AD1], "require_upsync": {"system": "s2",
                                                   "physical": s2.physical("jean")}}
    status, data = api(fed, "POST", "/v1/holds", body)
    assert status == 409 and "no up-sync" in data["error"]
    assert sorted(data["missing"]) == sorted([AD1, ALIAS])
    fed.client.upsync("s2", {s2.physical("jean"): [AD1]})
    status, data = api(fed, "POST", "/v1/holds", body)
    assert status == 409 and data["missing"] == [ALIAS]  # the alias the hold would cover
    assert fed.client.holds() == {}  # a refused hold holds nothing
    status, data = api(fed, "POST", "/v1/holds", {**body, "require_upsync": "s2"})
    assert status == 400
    fed.client.upsync("s2", {s2.physical("jean"): [AD1, ALIAS]})
    held = fed.client.hold([AD1], require_upsync={"system": "s2",
                                                  "physical": s2.physical("jean")})
    assert held.held == [AD1]


def test_holds_of_a_fed_from_before_the_shared_database_are_kept(
        tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> None:
    import sqlite3

    s1, _ = systems
    state = tmp_path / "old"
    state.mkdir()
    old = sqlite3.connect(state / "fed.db")
    old.executescript(
        "CREATE TABLE directory (address TEXT PRIMARY KEY, physical TEXT NOT NULL);"
        "CREATE TABLE systems (name TEXT PRIMARY KEY, host TEXT, port INTEGER, protocol TEXT);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE holds (address TEXT PRIMARY KEY, since REAL NOT NULL);"
        f"INSERT INTO directory VALUES ('{AD1}', '{s1.physical('jean')}');"
        f"INSERT INTO holds VALUES ('{AD1}', 1700000000.0);"
        "INSERT INTO meta VALUES ('version', '7');")
    old.commit()
    old.close()
    fed = Fed(state, [s1]).start()
    try:
        assert fed.client.lookup(AD1) == s1.physical("jean")
        assert list(fed.client.holds()) == [AD1]
        assert fed.client.directory().version == 7
        assert send(fed.smtp_port, [AD1], message("kept", "k@t"))[0] == 250
        assert fed.client.queue().held == 1
    finally:
        fed.kill()


def test_a_node_keeps_its_own_writes_over_a_reload_read_before_them(tmp_path: Path) -> None:
    from fed.routing.directory import Directory, read_snapshot
    from fed.routing.shared_db import SharedDB

    shared = SharedDB(f"sqlite:///{tmp_path}/shared.db")
    mine, other = Directory(shared), Directory(shared)
    stale = read_snapshot(shared, (-1, -1), -1)  # read before the write below
    mine.put(AD1, "jean@s1.invalid")
    mine.load(stale)
    assert mine.lookup(AD1) == "jean@s1.invalid"
    other.put(AD1, "jean@s2.invalid")  # another node, later: it wins at the next reload
    mine.load(read_snapshot(shared, mine.loaded, -1))
    assert mine.lookup(AD1) == "jean@s2.invalid"
    shared.close()
