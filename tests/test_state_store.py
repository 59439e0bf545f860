"""Opening a new state store from several processes at once upgrades it exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.timeout(120)


def test_concurrent_first_open_of_a_new_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    code = f"from reconciler.state.store import open_store; open_store({url!r}).close()"
    processes = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE,
                                  text=True) for _ in range(6)]
    results = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in processes]
    assert [rc for rc, _ in results] == [0] * 6, [err for _, err in results if err]
    with create_engine(url).connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert len(versions) == 1
