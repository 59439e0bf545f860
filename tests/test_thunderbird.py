"""Thunderbird profiles on disk: prefs.js round trip, profile discovery, the lock, the switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailferry.mail.imap.mutf7 import decode as decode_mutf7
from mailferry.mail.imap.mutf7 import encode as encode_mutf7
from station_agent import checks, config, localdata
from station_agent.clients import Thunderbird
from station_agent.thunderbird import profiles, switch
from station_agent.thunderbird.prefs import Prefs, PrefsError
from station_agent.thunderbird.switch import Endpoint

from sysutil import free_port
from tb_kit import (
    ADDRESS,
    OLD_HOST,
    POP_EXPECTED,
    POP_HOST,
    PREFS,
    dead_pid,
    hold_parentlock,
    lock_like_thunderbird,
    make_installation,
    make_pop3_installation,
    sleeper,
)

NEW_IMAP = Endpoint("imap.new.example", 1143, "starttls")
NEW_SMTP = Endpoint("smtp.new.example", 1587, "tls")


def test_prefs_round_trip_values_and_edits() -> None:
    prefs = Prefs(PREFS)
    assert prefs.render() == PREFS.encode()  # untouched: byte-for-byte
    assert prefs.get("mail.identity.id1.fullName") == 'Jean Dupönt "JD"'
    assert prefs.get("mail.identity.id1.htmlSigText") == "Jean Dupont\nCorp équipe\\IT"
    assert prefs.get("mail.server.server1.port") == 143
    assert prefs.get("mail.spellcheck.inline") is False
    assert prefs.get("mail.server.server1.namespace.personal") == '""'

    prefs.set("mail.identity.id1.fullName", 'Jean "J" \\ Dupont\n')
    prefs.set("mail.server.server1.port", 993)
    prefs.delete("mail.server.server1.directory-rel")
    prefs.set("mail.new.pref", True)
    text = prefs.render().decode()
    again = Prefs(text)
    assert again.get("mail.identity.id1.fullName") == 'Jean "J" \\ Dupont\n'
    assert again.get("mail.server.server1.port") == 993
    assert "mail.server.server1.directory-rel" not in again
    assert text.splitlines()[-1] == 'user_pref("mail.new.pref", true);'
    # Every line we did not touch is still there, in its order.
    untouched = [ln for ln in PREFS.splitlines()
                 if "id1.fullName" not in ln and "server1.port" not in ln
                 and "server1.directory-rel" not in ln]
    assert [ln for ln in text.splitlines() if ln in untouched] == untouched
    with pytest.raises(PrefsError, match="line 1"):
        Prefs('user_pref("x", someFunction());\n')


def test_modified_utf7() -> None:
    for name in ("Übersicht", "Entwürfe & Co", "日本語", "plain", "a&b"):
        assert decode_mutf7(encode_mutf7(name)) == name
    assert encode_mutf7("Übersicht") == "&ANw-bersicht"
    assert encode_mutf7("a&b") == "a&-b"


def test_profiles_ini_and_discovery(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    entries, install_default = profiles.read_profiles_ini(inst.ini)
    assert {e.name for e in entries} == {"default", "default-release"}
    assert install_default == inst.profile
    # [Install...] wins over Default=1 (which marks the other profile).
    assert profiles.find_profile(roots=[inst.ini.parent]) == inst.profile
    assert profiles.find_profile(name="default", roots=[inst.ini]) == inst.other
    assert profiles.find_profile(explicit=inst.profile) == inst.profile
    with pytest.raises(profiles.ProfileNotFound, match="no profile named"):
        profiles.find_profile(name="nope", roots=[inst.ini])
    with pytest.raises(profiles.ProfileNotFound, match=r"no Thunderbird profiles\.ini"):
        profiles.find_profile(roots=[tmp_path / "nowhere"])


def test_lock_detection_is_honest(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    assert profiles.running(inst.profile) is None
    # A stale lock (Thunderbird crashed; its PID is gone) and a leftover .parentlock.
    lock_like_thunderbird(inst.profile, dead_pid())
    (inst.profile / ".parentlock").write_bytes(b"")
    assert profiles.running(inst.profile) is None
    (inst.profile / "lock").unlink()
    live = sleeper()
    try:
        lock_like_thunderbird(inst.profile, live.pid)
        assert f"process {live.pid}" in (profiles.running(inst.profile) or "")
    finally:
        live.kill()
        live.wait(timeout=30)
    assert profiles.running(inst.profile) is None  # the same link, now stale
    (inst.profile / "lock").unlink()
    holder = hold_parentlock(inst.profile)
    try:
        assert "locked by a running Thunderbird" in (profiles.running(inst.profile) or "")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert profiles.running(inst.profile) is None


def test_switch_moves_one_account_and_rolls_back_exactly(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    original = inst.prefs.read_bytes()
    old, new = switch.switch(inst.profile, ADDRESS.upper(), imap=NEW_IMAP, smtp=NEW_SMTP,
                             username=ADDRESS)
    assert (old["host"], old["port"], old["user"]) == ("old-mail.corp.example", 143, "jdupont")
    assert (new["host"], new["port"], new["smtp"]["host"]) == ("imap.new.example", 1143,
                                                                "smtp.new.example")
    prefs = Prefs.load(inst.prefs)
    assert prefs.get("mail.server.server1.socketType") == 2
    assert prefs.get("mail.server.server1.userName") == ADDRESS
    assert "mail.server.server1.directory-rel" not in prefs  # a fresh cache for the new host
    assert "mail.server.server1.namespace.personal" not in prefs
    uri = "imap://jean.dupont%40corp.example@imap.new.example"
    assert prefs.get("mail.identity.id1.fcc_folder") == f"{uri}/Sent"
    assert prefs.get("mail.server.server1.spamActionTargetFolder") == f"{uri}/Junk"
    # The bare server URI Thunderbird writes on its first run, and another account filing
    # its junk into this one (spelled in other case): no pref names the old host any more.
    assert prefs.get("mail.server.server1.spamActionTargetAccount") == uri
    assert prefs.get("mail.server.server2.spamActionTargetFolder") == f"{uri}/Junk"
    assert not [k for k in prefs.keys("") if "old-mail" in str(prefs.get(k)).lower()]
    assert prefs.get("mail.smtpserver.smtp1.try_ssl") == 3
    assert prefs.get("mail.smtpserver.smtp1.port") == 1587
    # The private account, its SMTP server and everything else: byte-for-byte unchanged.
    for line in PREFS.splitlines():
        if ("server1." not in line and "smtp1." not in line and "id1." not in line
                and "old-mail" not in line.lower()):
            assert line in prefs.render().decode().splitlines(), line
    assert switch.backup_path(inst.profile).read_bytes() == original
    # Switching again derives from the backup: same result.
    switched = inst.prefs.read_bytes()
    switch.switch(inst.profile, ADDRESS, imap=NEW_IMAP, smtp=NEW_SMTP, username=ADDRESS)
    assert inst.prefs.read_bytes() == switched
    assert switch.rollback(inst.profile) is True
    assert inst.prefs.read_bytes() == original
    assert not switch.backup_path(inst.profile).exists()


def test_shared_smtp_server_gets_a_new_entry(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    inst.prefs.write_text(PREFS.replace('id2.smtpServer", "smtp2"', 'id2.smtpServer", "smtp1"'))
    switch.switch(inst.profile, ADDRESS, imap=NEW_IMAP, smtp=NEW_SMTP, username=ADDRESS)
    prefs = Prefs.load(inst.prefs)
    assert prefs.get("mail.identity.id1.smtpServer") == "smtp3"
    assert prefs.get("mail.smtpservers") == "smtp1,smtp2,smtp3"
    assert prefs.get("mail.smtpserver.smtp3.hostname") == "smtp.new.example"
    assert prefs.get("mail.smtpserver.smtp1.hostname") == "old-mail.corp.example"


def test_no_or_ambiguous_account(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    with pytest.raises(switch.SwitchError, match="no mail account"):
        switch.switch(inst.profile, "nobody@corp.example", imap=NEW_IMAP, smtp=NEW_SMTP,
                      username="x")
    assert not switch.backup_path(inst.profile).exists()  # nothing backed up, nothing changed
    inst.prefs.write_text(PREFS.replace("jean.perso@gmail.com\");\nuser_pref(\"mail.root",
                                        f"{ADDRESS}\");\nuser_pref(\"mail.root"))
    with pytest.raises(switch.SwitchError, match="2 accounts"):
        switch.find_account(Prefs.load(inst.prefs), ADDRESS)


def test_uri_rewrite_matches_the_old_server_in_every_spelling() -> None:
    text = (
        'user_pref("mail.account.account1.identities", "id1");\n'
        'user_pref("mail.account.account1.server", "server1");\n'
        'user_pref("mail.accountmanager.accounts", "account1");\n'
        'user_pref("mail.identity.id1.useremail", "alice@corp.example");\n'
        'user_pref("mail.identity.id1.fcc_folder", "imap://alice@corp.example@127.0.0.1/Sent");\n'
        'user_pref("mail.identity.id1.draft_folder", "imap://Alice%40Corp.example@127.0.0.1");\n'
        'user_pref("mail.server.server1.hostname", "127.0.0.1");\n'
        'user_pref("mail.server.server1.spamActionTargetAccount", '
        '"imap://alice%40corp.example@127.0.0.1");\n'
        'user_pref("mail.server.server1.type", "imap");\n'
        'user_pref("mail.server.server1.userName", "alice@corp.example");\n'
        'user_pref("mail.server.server9.spamActionTargetFolder", '
        '"imap://alice%40corp.example@127.0.0.1:143/Junk");\n'
        'user_pref("mail.other.list", "imap://alice%40corp.example@127.0.0.1/A,'
        'imap://bob%40corp.example@127.0.0.1/B,imap://alice%40corp.example@127.0.0.10/C");\n')
    prefs = Prefs(text)
    account = switch.find_account(prefs, "alice@corp.example")
    new = "imap://alice%40corp.example@imap.new.example"
    changed = switch.rewrite_uris(prefs, account, new)
    assert prefs.get("mail.server.server1.spamActionTargetAccount") == new  # bare
    assert prefs.get("mail.identity.id1.fcc_folder") == f"{new}/Sent"  # '@' not encoded
    assert prefs.get("mail.identity.id1.draft_folder") == new  # other case
    assert prefs.get("mail.server.server9.spamActionTargetFolder") == f"{new}/Junk"  # :port
    # Only the account's own URIs: bob's, and the host 127.0.0.10, stay.
    assert prefs.get("mail.other.list") == (f"{new}/A,imap://bob%40corp.example@127.0.0.1/B,"
                                           "imap://alice%40corp.example@127.0.0.10/C")
    assert len(changed) == 5


def test_thunderbird_tags_are_read_as_keywords(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    messages = [m for m in localdata.iter_messages(inst.profile / "Mail" / "Local Folders")
                if isinstance(m, localdata.LocalMessage)]
    keys = {m.data.split(b"Message-ID: ")[1].split(b"\n")[0].decode(): m.keywords
            for m in messages}
    assert keys["<tb-a1@x.example>"] == ("$label1", "projet_x")
    assert keys["<tb-c1@z.example>"] == ()
    assert localdata.valid_keyword("$label5") and localdata.valid_keyword("projet_x")
    for bad in ("\\Seen", "a(b", "a]b", "caf\u00e9", 'q"', ""):
        assert not localdata.valid_keyword(bad), bad


@pytest.mark.parametrize("policy", ["account", "merge"])
def test_pop3_account_folders_are_local_mail(tmp_path: Path, policy: str) -> None:
    inst = make_pop3_installation(tmp_path)
    client = Thunderbird(profile_dir=None, profile_name=None, profiles_ini=inst.ini,
                         archives=[], pop3_folders=policy)
    roots = client.local_roots(ADDRESS)
    pop_dir = inst.profile / "Mail" / POP_HOST
    prefix = "Work POP" if policy == "account" else ""
    assert (pop_dir, prefix) in roots
    folders: dict[str, set[str]] = {}
    for item in localdata.iter_messages(pop_dir, prefix):
        if isinstance(item, localdata.LocalMessage):
            mid = item.data.split(b"Message-ID: ")[1].split(b"\n")[0].decode()
            folders.setdefault(item.folder, set()).add(mid)
    def name(folder: str) -> str:
        if policy == "account":
            return f"Work POP/{folder}"
        return folder.replace("Inbox", "INBOX")
    assert folders == {name(f): ids for f, ids in POP_EXPECTED.items()}
    # Only the migrating account's: an IMAP account has no local folders of its own.
    imap = make_installation(tmp_path / "imap")
    imap_client = Thunderbird(profile_dir=imap.profile, profile_name=None, profiles_ini=None,
                              archives=[])
    assert [prefix for _, prefix in imap_client.local_roots(ADDRESS)] == ["Local Folders"]
    with pytest.raises(ValueError, match="pop3_folders"):
        Thunderbird(profile_dir=None, profile_name=None, profiles_ini=None, archives=[],
                    pop3_folders="inbox")


def test_pop3_switch_points_the_account_at_imap(tmp_path: Path) -> None:
    inst = make_pop3_installation(tmp_path)
    old, new = switch.switch(inst.profile, ADDRESS, imap=NEW_IMAP, smtp=NEW_SMTP,
                             username=ADDRESS)
    assert (old["type"], old["host"]) == ("pop3", POP_HOST)
    assert (new["type"], new["host"]) == ("imap", "imap.new.example")
    prefs = Prefs.load(inst.prefs)
    uri = "imap://jean.dupont%40corp.example@imap.new.example"
    assert prefs.get("mail.identity.id1.fcc_folder") == f"{uri}/Sent"
    assert prefs.get("mail.server.server1.spamActionTargetAccount") == uri
    assert not any(POP_HOST in str(prefs.get(k)) for k in prefs.keys(""))
    assert "mail.server.server1.directory-rel" not in prefs


def test_old_account_folder_goes_at_cleanup_unless_in_use(tmp_path: Path) -> None:
    inst = make_installation(tmp_path)
    cache = inst.profile / "ImapMail" / OLD_HOST
    (cache / "INBOX.msf").write_bytes(b"cached")
    (inst.profile / "ImapMail" / f"{OLD_HOST}.msf").write_bytes(b"")
    switch.switch(inst.profile, ADDRESS, imap=NEW_IMAP, smtp=NEW_SMTP, username=ADDRESS)
    # A help desk put the old settings back: the old folder is in use again, it stays.
    inst.prefs.write_bytes(switch.backup_path(inst.profile).read_bytes())
    removed, kept = switch.remove_old_store(inst.profile, ADDRESS)
    assert removed == [] and kept is not None and "still used by mail.server.server1" in kept
    assert cache.is_dir()
    switch.switch(inst.profile, ADDRESS, imap=NEW_IMAP, smtp=NEW_SMTP, username=ADDRESS)
    removed, kept = switch.remove_old_store(inst.profile, ADDRESS)
    assert kept is None
    assert removed == [cache, inst.profile / "ImapMail" / f"{OLD_HOST}.msf"]
    assert not cache.exists() and (inst.profile / "Mail" / "Local Folders" / "Archive").exists()
    assert switch.remove_old_store(inst.profile, ADDRESS) == ([], None)  # nothing left: fine
    assert switch.remove_backup(inst.profile) is True
    assert switch.remove_old_store(inst.profile, ADDRESS) == ([], None)  # no backup: nothing


def test_refused_connection_is_said_without_a_code() -> None:
    result = checks.try_submission(Endpoint("127.0.0.1", free_port()), ADDRESS, timeout=5)
    assert not result.ok and result.code is None
    text = result.describe()
    assert "failed at connect: ConnectionRefusedError" in text and "None" not in text


def test_pop3_folders_setting_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "station-agent.toml"
    text = config.render(api="http://127.0.0.1:1", station="ws", address=ADDRESS,
                         token_file="t")
    path.write_text(text)
    assert config.load(path)["pop3_folders"] == "account"  # the default, written out
    path.write_text(text.replace('pop3_folders = "account"', 'pop3_folders = "merge"'))
    assert config.load(path)["pop3_folders"] == "merge"
    path.write_text(text.replace('pop3_folders = "account"', 'pop3_folders = "inbox"'))
    with pytest.raises(config.ConfigError, match=r"station-agent\.toml: client\.pop3_folders"):
        config.load(path)
