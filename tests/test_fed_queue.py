"""Operating fed: the `fed queue` command, admin holds, Prometheus metrics, JSON logs."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedutil import REPO, TOKEN, FakeSystem, Fed, message, queue_id, send
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

A = "a@corp.example"


@pytest.fixture
def s1() -> Iterator[FakeSystem]:
    system = FakeSystem("s1", reply="451 4.3.0 try later").start()
    yield system
    system.stop()


@pytest.fixture
def fed(tmp_path: Path, s1: FakeSystem) -> Iterator[Fed]:
    running = Fed(tmp_path / "fed", [s1], extra=["--log-format", "json"]).start()
    running.client.put_entry(A, s1.physical("a"))
    yield running
    running.kill()


def fedq(fed: Fed, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run `fed queue ...` against this fed, as an admin would."""
    token_file = fed.state_dir.parent / f"{fed.state_dir.name}.token"
    return subprocess.run(
        [sys.executable, "-m", "fed", "queue", *args, "--control",
         f"127.0.0.1:{fed.control_port}", "--token-file", str(token_file)],
        input=stdin, capture_output=True, text=True, cwd=REPO, timeout=30)


def shown_json(fed: Fed, qid: str) -> dict[str, Any]:
    """`fed queue show QID --json`."""
    done = fedq(fed, "show", qid, "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def attempts(fed: Fed, qid: str) -> int:
    return sum(1 for r in fed.client.deliveries() if r.queue_id == qid)


def scrape(fed: Fed, token: str | None = TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{fed.control_port}/metrics",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels but `node`) -> value, parsed as Prometheus would; every sample
    carries the one node's name in `node`."""
    got = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert got and len({s.labels.get("node") for s in got}) == 1 and got[0].labels["node"]
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "node"))):
            s.value for s in got}


def test_queue_list_show_hold_flush_release(fed: Fed, s1: FakeSystem) -> None:
    q1 = queue_id(send(fed.smtp_port, [A], message("one", "q1@t"))[1])
    q2 = queue_id(send(fed.smtp_port, [A], message("two", "q2@t"))[1])
    wait_for(lambda: attempts(fed, q1) and attempts(fed, q2), what="deferred attempts")

    listed = fedq(fed, "list")
    assert listed.returncode == 0, listed.stderr
    assert q1 in listed.stdout and q2 in listed.stdout and "-> s1" in listed.stdout
    assert "451 4.3.0 try later" in listed.stdout and "in 2 messages" in listed.stdout

    held = fedq(fed, "hold", q1)
    assert held.returncode == 0 and f"{q1}: hold" in held.stdout
    # A hold does not abort an attempt already in flight (nor does Postfix's), and none
    # starts after the hold's answer: q1 is settled once fed shows it not in flight.
    wait_for(lambda: not shown_json(fed, q1)["in_flight"], what="q1's attempt in flight ended")
    before, seen = attempts(fed, q1), attempts(fed, q2)
    wait_for(lambda: attempts(fed, q2) >= seen + 2, what="q2 retried after the hold")
    assert attempts(fed, q1) == before, "q1 tried after its hold"
    s1.reply = "250 2.0.0 Ok"
    assert "flushed:" in fedq(fed, "flush").stdout
    wait_for(lambda: "<q2@t>" in s1.ids(), what="q2 delivered")
    assert s1.ids() == ["<q2@t>"], s1.ids()  # once, and the held q1 not at all
    assert attempts(fed, q1) == before

    as_json = json.loads(fedq(fed, "list", "--json").stdout)
    assert [m["queue_id"] for m in as_json] == [q1] and as_json[0]["admin_hold"]
    assert f"{q1}!" in fedq(fed, "list").stdout  # postqueue's mark of a held message
    shown = fedq(fed, "show", q1)
    assert shown.returncode == 0 and "admin hold:  20" in shown.stdout
    assert "Message-ID: <q1@t>" in shown.stdout and f"id {q1}" in shown.stdout

    released = fedq(fed, "release", q1)
    assert released.returncode == 0 and f"{q1}: release" in released.stdout
    wait_for(lambda: sorted(s1.ids()) == ["<q1@t>", "<q2@t>"], what="q1 delivered")
    missing = fedq(fed, "show", q1)
    assert missing.returncode == 1 and "not in the queue" in missing.stderr
    assert fedq(fed, "hold", "NOSUCHID").returncode == 1
    assert fedq(fed, "hold").returncode == 2  # usage: needs a queue id


def test_show_tells_a_message_in_flight_from_one_waiting(tmp_path: Path) -> None:
    """s1 answers DATA only when the test opens its gate: fed's attempt is in flight until
    then; held meanwhile, the message is waiting (and stays so) once the attempt is over."""
    s1 = FakeSystem("s1", reply="451 4.3.0 try later", gate=threading.Event(),
                    gate_limit=45).start()
    fed = Fed(tmp_path / "fed", [s1], extra=["--delivery-timeout", "60"]).start()
    try:
        fed.client.put_entry(A, s1.physical("a"))
        assert s1.gate is not None
        qid = queue_id(send(fed.smtp_port, [A], message("slow", "slow@t"))[1])
        assert s1.data_started.wait(20), "fed never reached DATA"
        shown = shown_json(fed, qid)
        assert shown["in_flight"] is True
        assert [(r["rcpt"], r["in_flight"]) for r in shown["recipients"]] == [(A, True)]
        assert fedq(fed, "hold", qid).returncode == 0  # a hold lets the attempt go on
        text = fedq(fed, "show", qid).stdout
        assert "in flight:   yes" in text and "being delivered now" in text, text
        assert attempts(fed, qid) == 0  # nothing recorded while the attempt runs
        s1.gate.set()
        wait_for(lambda: attempts(fed, qid) == 1, what="the attempt recorded")
        wait_for(lambda: not shown_json(fed, qid)["in_flight"], what="the attempt over")
        listed = json.loads(fedq(fed, "list", "--json").stdout)
        assert [(m["queue_id"], m["in_flight"]) for m in listed] == [(qid, False)]
        assert [r["in_flight"] for r in listed[0]["recipients"]] == [False]
        text = fedq(fed, "show", qid).stdout
        assert "in flight:   no" in text and "being delivered" not in text, text
        assert "451 4.3.0 try later" in text and attempts(fed, qid) == 1  # held: no more
    finally:
        if s1.gate is not None:
            s1.gate.set()
        fed.kill()
        s1.stop()


def test_queue_delete_asks_first_and_is_logged(fed: Fed, s1: FakeSystem) -> None:
    qid = queue_id(send(fed.smtp_port, [A, "b@s1.invalid"], message("del", "d@t"))[1])
    no = fedq(fed, "delete", qid, stdin="n\n")
    assert no.returncode == 1 and "not deleted" in no.stdout
    assert qid in fedq(fed, "list").stdout
    yes = fedq(fed, "delete", qid, stdin="y\n")
    assert yes.returncode == 0 and "2 pending recipients dropped" in yes.stdout
    assert fedq(fed, "delete", qid, "--yes").returncode == 1  # already gone
    assert not (fed.state_dir / "spool" / "queue" / f"{qid}.eml").exists()
    assert fed.client.queue().pending == 0
    logged = [r for r in fed.client.deliveries() if r.result == "deleted"]
    assert sorted(r.rcpt for r in logged) == [A, "b@s1.invalid"]
    s1.reply = "250 2.0.0 Ok"
    assert fedq(fed, "flush").returncode == 0
    qid2 = queue_id(send(fed.smtp_port, [A], message("after", "after@t"))[1])
    wait_for(lambda: s1.ids() == ["<after@t>"], what="the next message")
    assert qid2 != qid and "<d@t>" not in s1.ids()


def test_metrics(fed: Fed, s1: FakeSystem) -> None:
    assert scrape(fed, None)[0] == 401 and scrape(fed, "wrong")[0] == 401
    s2 = FakeSystem("s2").start()  # accepts; s1 keeps answering 451
    try:
        fed.client.put_system("s2", "127.0.0.1", s2.port, "lmtp")
        q1 = queue_id(send(fed.smtp_port, [A], message("m1", "m1@t"))[1])
        wait_for(lambda: attempts(fed, q1) >= 2, what="deferrals")
        fed.client.hold(["held@s2.invalid"])
        send(fed.smtp_port, ["held@s2.invalid"], message("held", "mh@t"))
        assert send(fed.smtp_port, ["victim@elsewhere.example"], b"x\r\n")[0] == 550
        status, text = scrape(fed)
        assert status == 200
        got = samples(text)
        assert got[("fed_accepted_total", ())] == 2
        assert got[("fed_smtp_refused_total", (("code", "550"),))] == 1
        assert got[("fed_deferred_total", (("destination", "s1"),))] >= 2
        assert got[("fed_queue_depth", (("destination", "s1"),))] == 1
        assert got[("fed_queue_depth", (("destination", "s2"),))] == 1
        assert got[("fed_queue_messages", ())] == 2
        assert got[("fed_held_recipients", ())] == 1 and got[("fed_holds", ())] == 1
        assert got[("fed_hold_oldest_age_seconds", ())] >= 0
        assert got[("fed_admin_held_messages", ())] == 0
        assert ("fed_delivered_total", (("destination", "s2"),)) not in got

        assert fedq(fed, "hold", q1).returncode == 0
        fed.client.release(["held@s2.invalid"])
        wait_for(lambda: s2.ids() == ["<mh@t>"], what="the released message")
        got = samples(scrape(fed)[1])
        assert got[("fed_delivered_total", (("destination", "s2"),))] == 1
        assert got[("fed_delivery_latency_seconds_count", ())] == 1
        assert got[("fed_admin_held_messages", ())] == 1
        assert got[("fed_admin_hold_oldest_age_seconds", ())] >= 0
        assert got[("fed_queue_depth", (("destination", "s1"),))] == 1
        assert ("fed_queue_depth", (("destination", "s2"),)) not in got
        assert got[("fed_holds", ())] == 0
    finally:
        s2.stop()


def test_metrics_public_switch(tmp_path: Path, s1: FakeSystem) -> None:
    running = Fed(tmp_path / "fed", [s1], extra=["--metrics-public"]).start()
    try:
        status, text = scrape(running, None)
        assert status == 200 and "fed_queue_depth" in text
        req = urllib.request.Request(f"http://127.0.0.1:{running.control_port}/v1/health")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401  # only /metrics is public
    finally:
        running.kill()


def test_json_logs_carry_the_queue_id(fed: Fed, s1: FakeSystem) -> None:
    s1.reply = "250 2.0.0 Ok"
    qid = queue_id(send(fed.smtp_port, [A], message("log", "log@t"))[1])
    wait_for(lambda: s1.ids() == ["<log@t>"], what="delivery")

    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in fed.log().splitlines() if line.startswith("{")]

    mine = wait_for(lambda: [r for r in lines() if r["queue_id"] == qid and
                             r["logger"] == "fed.delivery"], what="the delivery log line")
    assert mine and "a@s1.invalid" in str(mine[0]["msg"])
    queued = [r for r in lines() if r["queue_id"] == qid and r["logger"] == "fed.smtp"]
    assert len(queued) == 1 and "queued" in str(queued[0]["msg"])
    assert all({"ts", "level", "logger", "msg", "queue_id"} <= set(r) for r in lines())
    assert not [line for line in fed.log().splitlines() if line and not line.startswith("{")]


def test_list_names_a_live_node_it_cannot_reach_and_still_shows_the_others(
        fed: Fed, s1: FakeSystem) -> None:
    qid = queue_id(send(fed.smtp_port, [A], message("one", "one@t"))[1])
    wait_for(lambda: attempts(fed, qid), what="a deferred attempt")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    db = sqlite3.connect(fed.state_dir / "shared.db")
    with db:  # two more "live" nodes: one unreachable, one whose port answers as another
        for name, port in (("gone", dead_port), ("impostor", fed.control_port)):
            db.execute("INSERT INTO nodes (name, heartbeat_at, dead_after, holds_seen, "
                       "idle_for, started_at, info, control) VALUES (?, (julianday('now') - "
                       "2440587.5) * 86400.0, 3600, 0, 0, 0, 'test', ?)",
                       (name, f"127.0.0.1:{port}"))
    db.close()
    listed = fedq(fed, "list")
    assert listed.returncode == 2 and qid in listed.stdout and "in 1 messages" in listed.stdout
    assert "node gone" in listed.stderr and "not 'impostor'" in listed.stderr
    alone = fedq(fed, "list", "--this-node")
    assert alone.returncode == 0 and qid in alone.stdout and not alone.stderr
