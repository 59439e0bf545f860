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
    # the tail of each failure's traceback: the statement and SQLite's answer
    assert [rc for rc, _ in results] == [0] * 6, [err[-1500:] for _, err in results if err]
    with create_engine(url).connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert len(versions) == 1


def test_head_revision_read_from_the_scripts_is_alembics_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from reconciler.state.store import ALEMBIC_DIR, head_revision

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    assert head_revision() == ScriptDirectory.from_config(config).get_current_head()


def test_a_store_at_head_opens_without_alembic_an_older_one_is_upgraded(
        tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from reconciler.state.store import ALEMBIC_DIR, head_revision

    url = f"sqlite:///{tmp_path / 'state.db'}"
    code = (f"import sys; from reconciler.state.store import open_store; "
            f"open_store({url!r}).close(); print('alembic' in sys.modules)")

    def open_in_new_process() -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()

    assert open_in_new_process() == "True"  # a new store: created by Alembic
    assert open_in_new_process() == "False"  # at head: Alembic not even imported
    older = f"sqlite:///{tmp_path / 'older.db'}"  # a store of the release before the mover
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    with create_engine(older).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
    code = code.replace(url, older)
    assert open_in_new_process() == "True"
    with create_engine(older).connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) \
            == head_revision()
        columns = [r[1] for r in connection.execute(text("PRAGMA table_info(transfer_manifest)"))]
    assert "dst_uid" in columns
