"""`mover copy --processes N` (issue 22): the mailboxes split over forked processes, against
real Dovecot servers. Each mailbox copied by exactly one process (exact Message-ID counts
in the target), a re-run copies nothing, a child killed with SIGKILL leaves its share
reported unverified with the reason (exit 1) and the next run completes it with no
duplicate; the limits are divided among the processes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_mover_imap import REPO, fill, message, snapshot

from reconciler.mover.cli import _parser, _per_process
from reconciler.mover.processes import shares

from dovecot import DovecotPair, serve_pair
from helpers.mail import message_id

USERS = ("pa", "pb", "pc", "pd", "pe", "ka", "kb", "kc", "kd")


@pytest.fixture(scope="module")
def pair() -> Iterator[DovecotPair]:
    yield from serve_pair(USERS)


def ids(pair: DovecotPair, user: str) -> Counter[str]:
    """The Message-IDs in the target mailbox, counted (every folder)."""
    return Counter(message_id(k[1]) for k, n in snapshot(pair.dst, user).items()
                   for _ in range(n))


def command(pair: DovecotPair, users: Path, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reconciler.mover", "copy", "--src",
            f"127.0.0.1:{pair.src.port}", "--dst", f"127.0.0.1:{pair.dst.port}",
            "--users", str(users), "--state", str(state), "--progress", "none",
            "--report", "json", "--processes", "2", *extra]


def fill_users(pair: DovecotPair, users: tuple[str, ...], per_user: int) -> dict[str, set[str]]:
    """Distinct messages for each user (INBOX and a folder); their Message-IDs."""
    wanted: dict[str, set[str]] = {}
    for u, user in enumerate(users):
        numbers = range(1000 * (u + 1), 1000 * (u + 1) + per_user)
        data = [message(n) for n in numbers]
        fill(pair.src, user, {"INBOX": [(d, "") for d in data[::2]],
                              "Work": [(d, "\\Seen") for d in data[1::2]]})
        wanted[user] = {message_id(d) for d in data}
    return wanted


def test_each_mailbox_is_copied_by_one_process_exactly_once(
        pair: DovecotPair, tmp_path: Path) -> None:
    users = ("pa", "pb", "pc", "pd", "pe")
    wanted = fill_users(pair, users, 12)
    listing = tmp_path / "users.txt"
    listing.write_text("".join(f"{u} pw-{u}\n" for u in users))
    stats = tmp_path / "stats.json"
    first = subprocess.run([*command(pair, listing, tmp_path / "state.db"), "--stats",
                            str(stats)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    reports = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["mailbox"] for r in reports] == list(users)  # the users file's order
    assert all(r["verified"] and r["copied"] == 12 for r in reports), reports
    for user in users:
        found = ids(pair, user)
        assert set(found) == wanted[user] and set(found.values()) == {1}, user
    # two processes, the mailboxes dealt out between them: each named by exactly one
    announced = [line for line in first.stderr.splitlines() if " copies " in line]
    assert len(announced) == 2, first.stderr
    named = Counter(u for line in announced for u in users if f"{u}," in line or f"{u})" in line)
    assert named == Counter(users)
    figures = json.loads(stats.read_text())
    assert figures["processes"] == 2 and figures["copied"] == 60
    assert len(figures["peak_rss_mb_each"]) == 2

    again = subprocess.run(command(pair, listing, tmp_path / "state.db"), cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(json.loads(line)["copied"] == 0 for line in again.stdout.splitlines())
    assert all(set(ids(pair, u).values()) == {1} for u in users)


def _lines(stream: object, into: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)


def test_a_child_killed_with_sigkill_leaves_its_share_unverified_then_resumed_once(
        pair: DovecotPair, tmp_path: Path) -> None:
    users = ("ka", "kb", "kc", "kd")
    total = 120
    wanted = fill_users(pair, users, total)
    listing = tmp_path / "users.txt"
    listing.write_text("".join(f"{u} pw-{u}\n" for u in users))
    state = tmp_path / "state.db"
    # 80 messages/s for the copy, 40 for each process: 3 s a mailbox, time to kill one
    proc = subprocess.Popen([*command(pair, listing, state), "--max-msgs-per-s", "80",
                             "--batch-messages", "5"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[str] = []
    reader = threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True)
    reader.start()
    try:
        victim = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # bounded: 60 s
            announced = [line for line in list(err) if " copies " in line]
            copied = sum(ids(pair, u).total() for u in ("ka", "kc"))  # the first share
            if len(announced) == 2 and copied >= 10:
                victim = int(announced[0].split()[2])
                break
            time.sleep(0.1)
        assert victim is not None, f"no share seen copying: {err}"
        assert "ka, kc" in announced[0]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    reader.join(timeout=10)
    assert proc.returncode == 1
    reports = {r["mailbox"]: r for r in map(json.loads, out.splitlines())}
    assert set(reports) == set(users)
    for user in ("ka", "kc"):
        assert not reports[user]["verified"]
        assert f"process {victim} " in reports[user]["error"]
        assert "killed by signal 9 (SIGKILL)" in reports[user]["error"]
    for user in ("kb", "kd"):  # the other process finished its share
        assert reports[user]["verified"] and reports[user]["copied"] == total
    partial = sum(ids(pair, u).total() for u in ("ka", "kc"))
    assert 0 < partial < 2 * total

    done = subprocess.run(command(pair, listing, state), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for user in users:
        found = ids(pair, user)
        assert set(found) == wanted[user] and set(found.values()) == {1}, user


def test_shares_and_the_limits_each_process_gets() -> None:
    assert shares(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert shares(["a"], 4) == [["a"]]  # never an empty share
    args = _parser().parse_args(["copy", "--src", "h:1", "--dst", "h:2", "--users", "u",
                                 "--max-msgs-per-s", "90", "--dst-max-connections", "7",
                                 "--src-bytes-per-day", "1000", "--processes", "3"])
    each = _per_process(args, 3)
    assert (each.max_msgs_per_s, each.dst_max_connections, each.src_bytes_per_day) == \
        (30.0, 2, 333)  # rounded down: together never over the limit
    assert args.dst_max_connections == 7  # the command's own arguments are left as given
    two = argparse.Namespace(**{**vars(args), "dst_max_connections": 2})
    with pytest.raises(SystemExit, match="cannot be divided among --processes 3"):
        _per_process(two, 3)
