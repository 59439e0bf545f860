"""`fed serve --processes 2`: two node processes behind one SMTP port (fed/procs.py).

Real processes, real sockets on 127.0.0.1 and real aiosmtpd sinks: mail sent to the one
port is delivered by both nodes; a hold through the control API stops both; flip and
release deliver every held message once; a child killed with kill -9 under load is
restarted by the parent and nothing it acknowledged is lost. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.fedclient import FedClient

from fedutil import REPO, TOKEN, FakeSystem, Fed, fed_queue, message, send
from helpers.mail import Sender
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

AD1, OTHER = "jean.dupont@corp.example", "colleague@corp.example"


def children(fed: Fed) -> list[int]:
    """The node processes the parent runs now."""
    assert fed.proc is not None
    path = Path(f"/proc/{fed.proc.pid}/task/{fed.proc.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def node_clients(fed: Fed) -> list[FedClient]:
    """A control API client per node (ports from the parent's log)."""
    match = wait_for(lambda: re.search(r"nodes ready, control ports ([\d ]+)", fed.log()),
                     what="control ports in the log")
    return [FedClient(f"http://127.0.0.1:{port}", TOKEN, timeout=20)
            for port in match.group(1).split()]


def send_one(port: int, rcpt: str, msgid: str) -> bool:
    """One message on its own connection (like smtp-source); True if fed said 250 (an
    error on the way is raised, with its reason)."""
    return send(port, [rcpt], message("procs", msgid))[0] == 250


@pytest.fixture
def fed(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> Iterator[Fed]:
    started = Fed(tmp_path / "state", list(systems), extra=[
        "--processes", "2", "--node-lease", "2", "--delivery-timeout", "3"]).start()
    yield started
    nodes = children(started)
    assert started.stop() == 0
    # The parent stopped (and reaped) its nodes before it exited.
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in nodes),
             what="nodes gone")


def test_one_port_two_nodes_hold_stops_both_and_release_delivers_all_once(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, s2 = systems
    assert len(children(fed)) == 2
    nodes = node_clients(fed)
    assert len(nodes) == 2 and nodes[0].base_url.endswith(f":{fed.control_port}")
    fed.client.put_entry(AD1, s1.physical("jean"))
    fed.client.put_entry(OTHER, s1.physical("col"))
    wait_for(lambda: nodes[1].lookup(AD1) == s1.physical("jean"), what="entry on node 1")

    sent = [f"<free-{n}@t>" for n in range(40)]
    assert all(send_one(fed.smtp_port, AD1, m.strip("<>")) for m in sent)
    wait_for(lambda: len(s1.received) >= 40, timeout=30, what="40 deliveries at s1")
    assert sorted(s1.ids()) == sorted(sent)
    per_node = [len(c.deliveries(rcpt=s1.physical("jean"))) for c in nodes]
    assert sum(per_node) == 40 and min(per_node) > 0, per_node  # both processes took mail

    held = nodes[1].hold([AD1])  # through node 1: node 0 honours it too
    assert held.held == [AD1]
    during = [f"<held-{n}@t>" for n in range(30)]
    assert all(send_one(fed.smtp_port, AD1, m.strip("<>")) for m in during)
    assert send_one(fed.smtp_port, OTHER, "other@t")  # other mailboxes still flow
    wait_for(lambda: "<other@t>" in s1.ids(), what="the unheld message")
    counts = [c.queue().held for c in nodes]
    assert sum(counts) == 30 and min(counts) > 0, counts
    time.sleep(0.5)
    assert len(s1.received) == 41  # nothing held reached the old system

    assert sorted(fed.client.flip([AD1], s1.physical("jean"), s2.physical("jean")).flipped) \
        == [AD1]
    assert fed.client.release([AD1]).released == [AD1]
    wait_for(lambda: len(s2.received) >= 30, timeout=30, what="held mail at s2")
    wait_for(lambda: all(c.queue().pending == 0 for c in nodes), what="empty queues")
    assert sorted(s2.ids()) == sorted(during) and len(s1.received) == 41


def test_a_child_killed_under_load_is_restarted_and_loses_nothing_acknowledged(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    s1.delay = 0.1  # slower than acceptance: the killed node has a backlog in its spool
    fed.client.put_entry(AD1, s1.physical("jean"))
    wait_for(lambda: all(c.lookup(AD1) for c in node_clients(fed)), what="entry on both")
    senders = [Sender(fed.smtp_port, [AD1], tag=f"c{i}-", count=3000, pause=0, seconds=150)
               for i in range(4)]

    def acked_count() -> int:
        return sum(len(sender.acked_ids) for sender in senders)

    for sender in senders:
        sender.start()
    wait_for(lambda: acked_count() > 100, timeout=30, what="load")
    victim = children(fed)[1]
    os.kill(victim, signal.SIGKILL)
    at_kill = acked_count()
    wait_for(lambda: len(children(fed)) == 2 and victim not in children(fed), timeout=30,
             what="the parent restarting the node")
    wait_for(lambda: acked_count() > at_kill + 100, timeout=60, what="load after the restart")
    acked = [mid for sender in senders for mid in sender.finish(60)]
    assert len(set(acked)) == len(acked)
    assert "restarting node" in fed.log()
    # Its spool, recovered at the restart (the other node kept accepting meanwhile: the
    # load alone does not show the restart is done).
    recovered = wait_for(lambda: re.findall(r"state \S+/node-1: (\d+) messages", fed.log())[1:],
                         timeout=30, what="the restarted node's recovery line")
    assert int(recovered[0]) > 0, recovered
    wait_for(lambda: set(acked) <= set(s1.ids()), timeout=90,
             what="every acknowledged message delivered")
    nodes = node_clients(fed)
    wait_for(lambda: all(c.queue().pending == 0 for c in nodes), what="empty queues")
    # At least once: a message being delivered at the kill may arrive twice, nothing more.
    assert len(s1.ids()) - len(set(s1.ids())) <= 16


def test_a_stopped_node_takes_no_connection_the_other_node_accepts_them_all(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    """The nodes share one listening socket: whichever is idle accepts. A node that hangs
    (SIGSTOP) leaves every new connection to the other, none waits in a backlog of its
    own (with a socket per node and SO_REUSEPORT, the kernel gave it about half of them,
    and each of those waited for the hung node)."""
    s1, _ = systems
    fed.client.put_entry(AD1, s1.physical("jean"))
    wait_for(lambda: all(c.lookup(AD1) for c in node_clients(fed)), what="entry on both")
    victim = children(fed)[1]
    ids = [f"<stopped-node-{n}@procs.test>" for n in range(40)]
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for mid in ids:
            with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=5) as client:
                refused = client.sendmail("sender@outside.example", [AD1],
                                          message("procs", mid))
                assert refused == {}
        took = time.monotonic() - started
    finally:
        os.kill(victim, signal.SIGCONT)
    assert took < 20
    wait_for(lambda: set(ids) <= set(s1.ids()), timeout=30, what="all delivered")
    assert sorted(s1.ids()) == sorted(ids)


def test_a_taken_port_or_a_node_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    base = [sys.executable, "-m", "fed", "serve", "--processes", "2", "--control",
            "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), "--token-file", str(token),
            "--domain", "corp.example"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*base, "--smtp", f"127.0.0.1:{port}"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot listen" in done.stderr
    done = subprocess.run([*base, "--smtp", "127.0.0.1:0", "--shared-db", "nosuchdb://x"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "before it was ready" in done.stderr
    assert "fed ready" not in done.stdout




def test_fed_queue_on_node_0_lists_shows_and_deletes_across_both_nodes(
        fed: Fed, systems: tuple[FakeSystem, FakeSystem]) -> None:
    s1, _ = systems
    nodes = node_clients(fed)
    fed.client.put_entry(AD1, s1.physical("jean"))
    wait_for(lambda: nodes[1].lookup(AD1) == s1.physical("jean"), what="entry on node 1")
    nodes[0].hold([AD1])  # queued, not delivered, on whichever node took each message
    ids = [f"q-{n}@t" for n in range(16)]
    assert all(send_one(fed.smtp_port, AD1, m) for m in ids)

    def held() -> list[int] | None:
        counts = [n.queue().held for n in nodes]
        return counts if sum(counts) == 16 else None

    counts = wait_for(held, what="16 held messages")
    assert min(counts) > 0, counts  # both nodes hold some

    listed = fed_queue(fed, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    messages = json.loads(listed.stdout)
    assert sorted(m["message_id"] for m in messages) == sorted(f"<{m}>" for m in ids)
    by_node: dict[str, list[str]] = {}
    for m in messages:
        by_node.setdefault(m["node"], []).append(m["queue_id"])
    assert sorted(len(q) for q in by_node.values()) == sorted(counts), by_node

    mine = fed_queue(fed, "list", "--json", "--this-node")  # node 0 alone
    assert mine.returncode == 0, mine.stderr
    own = {m["queue_id"] for m in json.loads(mine.stdout)}
    (node0,) = {m["node"] for m in json.loads(mine.stdout)}
    (node1,) = set(by_node) - {node0}
    text = fed_queue(fed, "list")
    assert text.returncode == 0 and "in 16 messages" in text.stdout
    assert f"[{node0}]" in text.stdout and f"[{node1}]" in text.stdout

    far = by_node[node1][0]  # lives on node 1; the command is pointed at node 0
    assert far not in own
    shown = fed_queue(fed, "show", far)
    assert shown.returncode == 0, shown.stderr
    assert f"queue id:    {far}" in shown.stdout and f"node:        {node1}" in shown.stdout
    on_hold = fed_queue(fed, "hold", far)
    assert on_hold.returncode == 0 and f"{far}: hold on node {node1}" in on_hold.stdout
    deleted = fed_queue(fed, "delete", far, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert f"{far}: deleted (1 pending recipients dropped) on node {node1}" in deleted.stdout
    gone = fed_queue(fed, "show", far)
    assert gone.returncode == 1 and "404" in gone.stderr
    assert nodes[1].queue().held == len(by_node[node1]) - 1
    flushed = fed_queue(fed, "flush")
    assert flushed.returncode == 0 and "(2 nodes)" in flushed.stdout

    # /metrics stays per node; each node's samples carry its own name.
    names = set()
    for client in nodes:
        req = urllib.request.Request(client.base_url + "/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            found = set(re.findall(r'node="([^"]+)"', resp.read().decode()))
        assert len(found) == 1
        names |= found
    assert names == {node0, node1}
    assert fed.client.release([AD1]).released == [AD1]
    wait_for(lambda: len(s1.received) >= 15, timeout=30, what="the 15 left delivered")
