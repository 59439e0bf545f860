"""The station agent on a profile the real Thunderbird made, then Thunderbird run on the result.

One workstation, one profile written by `thunderbird --headless` itself (tests/tb_real.py):
jean's IMAP account on the old server 127.0.0.2, marie's POP3 account on 127.0.0.3 (her
only copy of her mail in Mail/127.0.0.3/), Local Folders, tags, junk moved into jean's Junk.
Both are migrated by the agent (`station-agent run --once`, discovery through the
profiles.ini Thunderbird wrote) to a private Dovecot on 127.0.0.1; then Thunderbird starts
on the switched profile, loads the accounts and rewrites prefs.js, and is stopped: the
accounts must still point at the new servers, and no pref may name an old host.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.api.enrolment import write_station_kit
from station_agent.thunderbird.prefs import Prefs

import tb_real
from dovecot import Dovecot, private_root, skip_unless_available
from stationkit import (
    OTHER_STATION,
    REPO,
    STATION,
    World,
    add_migration,
    reports,
    set_action,
    world,
)
from test_thunderbird_station import PASSWORD, _imap_contents

__all__ = ["world"]  # the fixture, imported for pytest
pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
def dovecot() -> Iterator[Dovecot]:
    skip_unless_available()
    tb_real.skip_unless_available()
    root = private_root()
    server = Dovecot(root, "target", {tb_real.IMAP_USER: PASSWORD,
                                      tb_real.POP_USER: PASSWORD}).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _kit(world: World, tmp_path: Path, station: str, address: str, ini: Path) -> Path:
    kit = tmp_path / f"kit-{station}"
    _, config = write_station_kit(kit, api=world.api, station=station, address=address,
                                  token=world.tokens[station])
    (kit / "imap.password").write_text(PASSWORD + "\n")
    text = config.read_text().replace("archives = []",
                                      f'archives = []\nprofiles_ini = "{ini}"')
    config.write_text(text.replace("min_free_mb = 100", "min_free_mb = 1")
                      .replace("retries = 3", "retries = 0"))
    return config


def _agent(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "station_agent", "run", "--once",
                           "--config", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


def _migrate(world: World, config: Path, address: str, mid: int | None = None) -> None:
    if mid is None:
        mid = add_migration(world.store, address=address, action="local-migrate", state=8)
    else:
        set_action(world.store, mid, "local-migrate")
    result = _agent(config)
    log = (config.parent / "agent.log").read_text()
    assert result.returncode == 0, log
    kinds = [r.kind for r in reports(world.store)
             if r.migration_id == mid and not r.kind.startswith("check")]
    assert kinds == ["local-data", "switch", "test", "cleanup", "done"], log


def _old_hosts(prefs: Prefs) -> list[str]:
    return [f"{k} = {prefs.get(k)}" for k in prefs.keys("")
            if any(h in str(prefs.get(k)) for h in (tb_real.OLD_IMAP, tb_real.OLD_POP))]


def test_real_thunderbird_profile_migrated_and_still_switched_after_a_run(
        world: World, dovecot: Dovecot, tmp_path: Path) -> None:
    world.imap = {"host": "127.0.0.1", "port": dovecot.port, "tls": "none"}
    home = tmp_path / "home"
    ini, profile = tb_real.make_profile(home)
    written = Prefs.load(profile / "prefs.js")
    # What Thunderbird added on its own: the caches and folders of both accounts.
    assert written.get("mail.server.server1.directory-rel") == "[ProfD]ImapMail/127.0.0.2"
    assert written.get("mail.server.server2.directory-rel") == "[ProfD]Mail/127.0.0.3"
    assert written.get("mail.server.server1.spamActionTargetAccount") == tb_real.JEAN_URI
    assert (profile / "ImapMail" / tb_real.OLD_IMAP).is_dir()

    # E22 on marie's station: her POP3 folder counts as local mail (E23's size).
    marie = _kit(world, tmp_path, OTHER_STATION, tb_real.POP_USER, ini)
    marie_mid = add_migration(world.store, address=tb_real.POP_USER, action="check2")
    assert _agent(marie).returncode == 0, (marie.parent / "agent.log").read_text()
    [check] = reports(world.store, "check2")
    assert check.ok, check.detail
    assert check.detail["mailbox_size"] == sum(
        len(m) for folder in (tb_real.LOCAL, tb_real.POP) for ms in folder.values() for m in ms)

    _migrate(world, _kit(world, tmp_path, STATION, tb_real.IMAP_USER, ini), tb_real.IMAP_USER)
    _migrate(world, marie, tb_real.POP_USER, marie_mid)

    for user, expected in ((tb_real.IMAP_USER, tb_real.EXPECTED_JEAN),
                           (tb_real.POP_USER, tb_real.EXPECTED_MARIE)):
        seen = _imap_contents(dovecot, user)
        for folder, ids in expected.items():
            assert {m for m, _, _ in seen[folder]} == ids, (user, folder, seen)
        flags = {m: f.split() for items in seen.values() for m, f, _ in items}
        if user == tb_real.IMAP_USER:
            assert {"\\Seen", "$label1", "projet_x"} <= set(flags["<real-a1@x.example>"])
            assert {"\\Flagged", "$label4"} <= set(flags["<real-c1@x.example>"])
        else:
            assert {"\\Seen", "$label2"} <= set(flags["<real-d1@y.example>"])
            assert "\\Seen" not in flags["<real-e1@y.example>"]
            assert "projet_x" in flags["<real-f1@y.example>"]
    # E33 with no delay: the old IMAP cache and the uploaded POP3 mbox files are gone.
    assert not (profile / "ImapMail" / tb_real.OLD_IMAP).exists()
    assert not (profile / "Mail" / tb_real.OLD_POP).exists()
    assert (profile / "Mail" / "Local Folders" / "Archive").exists()
    switched = Prefs.load(profile / "prefs.js")
    assert _old_hosts(switched) == []

    # Thunderbird starts on the switched profile, makes its caches for the new server and
    # rewrites prefs.js; then it is stopped.
    tb_real.run_until(home, profile, tb_real.has_prefs(
        profile, "mail.server.server1.directory-rel", "mail.server.server2.directory-rel"),
        "load the switched accounts")
    after = Prefs.load(profile / "prefs.js")
    smtp_port = int(world.accepting.rsplit(":", 1)[1])
    for server, smtp, user in (("server1", "smtp1", tb_real.IMAP_USER),
                               ("server2", "smtp2", tb_real.POP_USER)):
        base = f"mail.server.{server}."
        assert (after.get(base + "type"), after.get(base + "hostname"),
                after.get(base + "port"), after.get(base + "userName")) == \
            ("imap", "127.0.0.1", dovecot.port, user)
        # A fresh cache ("127.0.0.1", then Thunderbird's unique "127.0.0-1.1" for the second).
        assert str(after.get(base + "directory-rel")).startswith("[ProfD]ImapMail/127.0.0")
        assert (after.get(f"mail.smtpserver.{smtp}.hostname"),
                after.get(f"mail.smtpserver.{smtp}.port")) == ("127.0.0.1", smtp_port)
    new_uri = "imap://jean.dupont%40corp.example@127.0.0.1"
    assert after.get("mail.server.server1.spamActionTargetAccount") == new_uri
    assert after.get("mail.server.server2.spamActionTargetFolder") == f"{new_uri}/Junk"
    assert _old_hosts(after) == []
    text = (profile / "prefs.js").read_text(encoding="utf-8")
    assert tb_real.OLD_IMAP not in text and tb_real.OLD_POP not in text
