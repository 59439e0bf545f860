"""`reconcile demo` as a user runs it: real processes, mail flowing, counted in the mailboxes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from world import run_cli

pytestmark = pytest.mark.timeout(180)


def test_demo_moves_everything_once(tmp_path: Path) -> None:
    result = run_cli("demo", "--workdir", str(tmp_path / "demo"), cwd=tmp_path, timeout=150)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.rstrip().splitlines()[-3:-1] == ["lost: 0", "duplicated: 0"]
    acked = int(re.search(r"acknowledged by fed \(250\):\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    found = int(re.search(r"acknowledged found in new mailboxes:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert acked > 50 and found == acked
    assert "mailboxes migrated (state 13):        20 of 20" in out
    assert "delivered to an old mailbox after its hold began: 0" in out
