"""Live progress where the work is long: bars on a terminal, plain lines elsewhere.

Each command runs as a real subprocess, once on a pseudo-terminal (its stdout and stderr a
pty of 120 columns, so rich draws its live bars) and once with pipes (no terminal: plain
lines, no control sequences):

- `python -m reconciler.mover copy` between two embedded maildir stores, throttled so the
  copy lasts long enough for a bar per running mailbox, with rates and ETA;
- `reconcile --apply` moving a wave between the world's systems: a bar per wave and per
  running copy; with `--json` on a terminal: JSON Lines only, no bars.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.demo import fill_old_mail
from reconciler.drivers.base import mailbox_id_for
from reconciler.drivers.maildir import MaildirDriver

from world import REPO, World, placement, policy

pytestmark = pytest.mark.timeout(180)
ESC = "\x1b["


def on_tty(cmd: list[str], cwd: Path, timeout: float = 90,
           stop_when: str | None = None) -> tuple[int, str]:
    """Run `cmd` with a pty as stdin, stdout and stderr; (exit code, everything it wrote).
    `stop_when`: SIGTERM it once its output contains that text (a watch loop)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
                if stop_when is not None and stop_when in b"".join(chunks).decode(
                        "utf-8", "replace"):
                    proc.terminate()
                    stop_when = None
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, b"".join(chunks).decode("utf-8", "replace")


def maildir(root: Path) -> MaildirDriver:
    return MaildirDriver("md", root, ("127.0.0.1", 0), ("127.0.0.1", 0), "local")


def mover_cmd(tmp: Path, progress: str) -> list[str]:
    return [sys.executable, "-m", "reconciler.mover", "copy", "--src", f"maildir:{tmp / 'src'}",
            "--dst", f"maildir:{tmp / progress}", "--users", str(tmp / "users.txt"),
            "--state", str(tmp / f"{progress}.db"), "--progress", progress,
            "--max-msgs-per-s", "25"]


@pytest.fixture
def two_users(tmp_path: Path) -> Path:
    src = maildir(tmp_path / "src")
    rng = random.Random(3)
    for user in ("ann", "bob"):
        src.create_mailbox(user)
        fill_old_mail(src, user, f"{user}@corp.example", 30, rng)
    (tmp_path / "users.txt").write_text("ann -\nbob -\n")
    return tmp_path


def test_mover_copy_draws_bars_on_a_terminal(two_users: Path) -> None:
    code, out = on_tty(mover_cmd(two_users, "tty"), REPO)
    assert code == 0, out
    assert ESC in out  # drawn live, in place
    assert "  ann" in out and "  bob" in out  # one bar per running mailbox...
    assert "messages" in out and "/s" in out and "ETA" in out  # ...with rates and ETA
    assert "2/2 mailboxes" in out  # the run's bar, at its end
    assert "ann: verified, 30 copied" in out and "bob: verified, 30 copied" in out


def test_mover_copy_plain_lines_off_a_terminal(two_users: Path) -> None:
    cmd = mover_cmd(two_users, "auto")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert ESC not in done.stderr
    lines = done.stderr.splitlines()
    assert "ann: verified, 30 copied, 0 present, 0 failed" in lines
    assert "bob: verified, 30 copied, 0 present, 0 failed" in lines
    assert any(line.startswith("mover: 2/2 mailboxes, 60/60 messages, 60 copied")
               for line in lines)


def back_again(doc: dict[str, Any]) -> dict[str, Any]:
    doc["spec"]["allowMoveBack"] = True
    return doc


def test_apply_draws_wave_bars_on_a_terminal_and_not_with_json(world: World,
                                                                tmp_path: Path) -> None:
    boxes = [{"address": f"bars{i}@corp.example"} for i in range(1, 5)]
    state = str(tmp_path / "state.db")
    first = world.engine(world.write(tmp_path / "v1", [placement("bars-home", "s1", boxes)]),
                         f"sqlite:///{state}")
    first.apply()
    rng = random.Random(5)
    for box in boxes:
        fill_old_mail(first.drivers["s1"], mailbox_id_for(box["address"]), box["address"], 30,
                      rng)
    specs = world.write(tmp_path / "v2", [
        policy("bars-slow", throttle={"messagesPerSecond": 60}),
        placement("bars-wave", "s2", boxes, policy_name="bars-slow")])
    base = [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state", state]
    code, out = on_tty([*base, "--apply", "--allow-dirty"], tmp_path)
    assert code == 0, out
    assert ESC in out
    assert "wave bars-wave" in out and "mailboxes at 10+" in out
    assert "4/4 mailboxes at 10+" in out  # the wave's bar reached its end
    assert "  bars1@corp.example" in out and "ETA" in out  # a running copy's bar
    assert "E15" in out  # the step lines still print

    # --watch on a terminal: the same bars for each pass that has something to do.
    back = world.write(tmp_path / "v4", [
        policy("bars-slow", throttle={"messagesPerSecond": 60}),
        back_again(placement("bars-wave", "s1", boxes, policy_name="bars-slow"))])
    code, out = on_tty([*base[:4], str(back), *base[5:], "--watch", "--allow-dirty",
                        "--interval", "5"], tmp_path, stop_when="4 in sync")
    assert "wave bars-wave" in out and "4/4 mailboxes at 10+" in out, out[-2000:]
    assert "applied E41-E42" in out

    # Off a terminal and with --json on one: no bars, the lines as before.
    again = world.write(tmp_path / "v3", [
        policy("bars-slow", throttle={"messagesPerSecond": 60}),
        back_again(placement("bars-wave", "s2", boxes, policy_name="bars-slow", window=None))])
    code, out = on_tty([sys.executable, "-m", "reconciler", "--specs", str(again), "--state",
                        state, "--apply", "--allow-dirty", "--json"], tmp_path)
    assert code in (0, 1), out
    assert ESC not in out and "mailboxes at 10+" not in out
    for line in out.replace("\r\n", "\n").strip().splitlines():
        if line.startswith("{"):
            json.loads(line)
