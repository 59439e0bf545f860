"""`mover copy` in a new process over a state store it already wrote (issue 22's no-op
re-run): against real Dovecot servers, a run that finds every folder unchanged never imports
SQLAlchemy (nor does one that copies: the store is read and appended through sqlite3),
records its pass all the same, and a run after a change copies exactly what changed,
counted by Message-ID on the target; a copy pass whose source is unchanged does not connect
to the target, the final pass always does."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from test_mover_imap import REPO, fill, message, snapshot
from test_mover_stream import Relay

from reconciler.state.model import TransferRun
from reconciler.state.store import Store, default_url

from dovecot import Dovecot, DovecotPair, serve_pair
from helpers.mail import message_id

USERS = ("cora", "dirk", "elsa", "fay")


@pytest.fixture(scope="module")
def pair() -> Iterator[DovecotPair]:
    yield from serve_pair(USERS)


def ids(server: Dovecot, user: str) -> Counter[tuple[str, str]]:
    """(folder, Message-ID) of every message of a user on a server, with repeats."""
    return Counter((k[0], message_id(k[1])) for k, n in snapshot(server, user).items()
                   for _ in range(n))


def cli(pair: DovecotPair, users: Path, state: Path, *extra: str,
        dst_port: int | None = None, src_port: int | None = None) -> tuple[dict[str, Any], str]:
    """One `mover copy` in a new process (from the source's port, or `src_port`; to the
    target's, or `dst_port`: a relay); its report (one mailbox) and what it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reconciler.mover", "copy", "--src",
         f"127.0.0.1:{src_port or pair.src.port}", "--dst",
         f"127.0.0.1:{dst_port or pair.dst.port}",
         "--users", str(users), "--state", str(state), "--progress", "none", "--report",
         "json", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    imported = "\n".join(line for line in done.stderr.splitlines()
                         if line.startswith("import time:"))
    return json.loads(done.stdout), imported


def test_a_rerun_imports_no_sqlalchemy_and_a_change_is_copied_exactly_once(
        pair: DovecotPair, tmp_path: Path) -> None:
    user = "cora"
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(4)],
                          "Work": [(message(10), "\\Seen")]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")
    state = tmp_path / "state.db"

    first, imported = cli(pair, users, state)
    assert first["verified"] and first["copied"] == 5
    assert " sqlalchemy" not in imported  # a new store: made from the schema script
    wanted = ids(pair.src, user)
    assert ids(pair.dst, user) == wanted and set(wanted.values()) == {1}

    again, imported = cli(pair, users, state)
    assert again["verified"] and again["copied"] == 0 and again["present"] == 5
    assert not again["target_read"]  # the source unchanged: the target left alone
    assert {f["folder"]: f["unchanged"] for f in again["folders"]} == {
        "INBOX": True, "Work": True}
    assert imported and " sqlalchemy" not in imported and "reconciler.state.model" not in imported
    store = Store(default_url(state))
    with store.session() as session:  # the pass was recorded all the same, as verified
        runs = session.execute(select(TransferRun.verified, TransferRun.copied,
                                      TransferRun.present, TransferRun.report)
                               .where(TransferRun.mailbox == user)
                               .order_by(TransferRun.id)).all()
    store.close()
    assert [(v, c, p) for v, c, p, _ in runs] == [(True, 5, 0), (True, 0, 5)]
    assert json.loads(runs[1][3] or "{}")["folders"][0]["unchanged"] is True

    fill(pair.src, user, {"INBOX": [(message(20), "")]})  # one new message in the source
    third, imported = cli(pair, users, state)
    assert third["verified"] and third["copied"] == 1 and third["present"] == 5
    assert third["target_read"]
    assert " sqlalchemy" not in imported  # the manifest's rows through sqlite3 too
    assert {f["folder"]: f["unchanged"] for f in third["folders"]} == {
        "INBOX": False, "Work": True}
    wanted = ids(pair.src, user)
    assert ids(pair.dst, user) == wanted and set(wanted.values()) == {1}
    assert sum(wanted.values()) == 6

    fourth, imported = cli(pair, users, state)  # and quiet again
    assert fourth["copied"] == 0 and fourth["verified"] and " sqlalchemy" not in imported


def test_an_unchanged_source_leaves_the_target_unread_until_the_final_pass(
        pair: DovecotPair, tmp_path: Path) -> None:
    """Issue 22: a copy pass whose source folders are all as at the last verified pass
    does not connect to the target at all (counted by a relay in front of it: each
    connection is accepted before a login can start); it says so in its report. A message
    the target lost meanwhile is therefore not seen by such a pass, but by the final pass
    (`--phase final`, E41's), which always reads the target: it copies it again, once;
    `--read-target` reads it too, and a change in the source opens the target again."""
    user = "dirk"
    fill(pair.src, user, {"INBOX": [(message(30 + i), "") for i in range(3)],
                          "Work": [(message(40), "")]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")
    state = tmp_path / "state.db"
    relay = Relay(pair.dst.port)
    try:
        first, _ = cli(pair, users, state, dst_port=relay.port)
        assert first["verified"] and first["copied"] == 4 and first["target_read"]
        assert relay.connections == 1

        again, _ = cli(pair, users, state, dst_port=relay.port)
        assert relay.connections == 1  # no connection to the target, so no login
        assert again["verified"] and not again["target_read"]
        assert again["copied"] == 0 and again["present"] == 4
        assert {f["folder"]: f["unchanged"] for f in again["folders"]} == {
            "INBOX": True, "Work": True}

        pair.dst.doveadm("expunge", "-u", user, "mailbox", "INBOX", "uid", "2")
        blind, _ = cli(pair, users, state, dst_port=relay.port)
        assert relay.connections == 1 and not blind["target_read"]
        assert blind["copied"] == 0  # what a pass that trusts the last proof cannot see

        final, _ = cli(pair, users, state, "--phase", "final", dst_port=relay.port)
        assert relay.connections == 2 and final["target_read"]
        assert final["verified"] and final["copied"] == 1 and final["present"] == 3
        wanted = ids(pair.src, user)
        assert ids(pair.dst, user) == wanted and set(wanted.values()) == {1}

        checked, _ = cli(pair, users, state, "--read-target", dst_port=relay.port)
        assert relay.connections == 3 and checked["target_read"]
        assert checked["verified"] and checked["copied"] == 0

        fill(pair.src, user, {"Work": [(message(41), "")]})
        changed, _ = cli(pair, users, state, dst_port=relay.port)
        assert relay.connections == 4 and changed["target_read"]
        assert changed["verified"] and changed["copied"] == 1
        assert {f["folder"]: f["unchanged"] for f in changed["folders"]} == {
            "INBOX": True, "Work": False}
    finally:
        relay.close()
    wanted = ids(pair.src, user)
    assert ids(pair.dst, user) == wanted and set(wanted.values()) == {1}
    assert sum(wanted.values()) == 5


def test_the_exit_status_and_the_output_survive_the_quick_exit(
        pair: DovecotPair, tmp_path: Path) -> None:
    """`python -m reconciler.mover` ends with `os._exit` (no interpreter teardown): what it
    printed is all there and its status is the command's."""
    users = tmp_path / "users.txt"
    users.write_text("elsa wrong-password\n")
    base = [sys.executable, "-m", "reconciler.mover", "copy", "--src",
            f"127.0.0.1:{pair.src.port}", "--dst", f"127.0.0.1:{pair.dst.port}", "--users",
            str(users), "--state", str(tmp_path / "state.db"), "--progress", "none"]
    refused = subprocess.run([*base, "--report", "json"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1, refused.stderr[-2000:]
    report = json.loads(refused.stdout)
    assert report["mailbox"] == "elsa" and not report["verified"]
    assert "ImapLoginError" in report["error"]
    assert '"verified": false' in refused.stderr  # the stats line, after the report
    no_env = subprocess.run([*base, "--src-admin", "admin"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert no_env.returncode == 1
    assert "--*-admin needs --*-admin-password-env" in no_env.stderr
    bad_flag = subprocess.run([*base, "--no-such-flag"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
    assert bad_flag.returncode == 2 and "unrecognized arguments" in bad_flag.stderr


def test_copying_back_with_the_same_state_file_reads_the_other_servers_mail(
        pair: DovecotPair, tmp_path: Path) -> None:
    """A -> B, then B -> A with the same --state. B held a message of its own (its UID 1)
    before the copy and lost one of the copies since, and its INBOX has A's UIDVALIDITY
    (two folders created in one second, or a server that numbers them from 1). With one
    manifest for both directions, the first copy's rows stood for B's UIDs: B's messages
    read "changed since listing" against A's hashes, on every pass, and the copy back never
    verified (safe, but stuck). Each direction has its manifest now."""
    user = "fay"
    fill(pair.src, user, {"INBOX": [(message(700 + i), "") for i in range(6)]})
    fill(pair.dst, user, {"INBOX": [(message(799), "")]})  # B's own, UID 1
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")
    state = tmp_path / "state.db"
    there, _ = cli(pair, users, state)
    assert there["verified"] and there["copied"] == 6

    doveadm = ["-u", user]
    validity = pair.src.doveadm("mailbox", "status", *doveadm, "uidvalidity", "INBOX")
    pair.dst.doveadm("mailbox", "update", *doveadm, "--uid-validity",
                     validity.split("=")[1].strip(), "INBOX")
    pair.dst.doveadm("expunge", *doveadm, "mailbox", "INBOX", "uid", "7")  # A's sixth
    on_b = ids(pair.dst, user)
    assert len(on_b) == 6 and ("INBOX", "<799@x.example>") in on_b

    back, _ = cli(pair, users, state, src_port=pair.dst.port, dst_port=pair.src.port)
    assert back["verified"] and back["copied"] == 1, back
    on_a = ids(pair.src, user)
    assert on_a == Counter({("INBOX", f"<{n}@x.example>"): 1
                            for n in [*range(700, 706), 799]})
