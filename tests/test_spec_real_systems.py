"""Spec format of the real-server drivers: postfix-dovecot and imap (no servers needed).

Checks that both load into typed settings with paths resolved and credentials kept as
references, and that the usual classes of mistake give one clear `FILE:LINE: FIELD` each:
a literal password, settings of the wrong driver, a missing settings object, a master login
without its master user.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.drivers.imap import ImapDriver, read_passwords
from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver
from reconciler.drivers.registry import make_drivers
from reconciler.spec.loader import load_specs
from reconciler.spec.model import Endpoint, SecretRef

from test_spec_loader import problems_of, write_set

PF = """\
apiVersion: mailferry/v1
kind: MailSystem
metadata: {name: pf1}
spec:
  driver: postfix-dovecot
  domains: [corp.example]
  postfixDovecot:
    stateDir: pf1/mailferry
    postfixConfigDir: /etc/postfix-pf1
    dovecotConfig: /etc/dovecot-pf1/dovecot.conf
    mailRoot: /srv/mail/pf1
    smtp: 127.0.0.1:10025
    lmtp: 127.0.0.1:10024
    imap: 127.0.0.1:10143
    masterUser: {user: mailferry, password: {env: PF1_MASTER_PASSWORD}}
---
apiVersion: mailferry/v1
kind: MailSystem
metadata: {name: old}
spec:
  driver: imap
  domains: [corp.example]
  imap:
    server: imap.old.example:993
    login: per-user
    passwords: {file: secrets/old-passwords}
    loginFormat: "{local}"
    stateDir: old-state
"""


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_both_drivers_load_with_references(here: Path) -> None:
    specs = load_specs(write_set(here, real_yaml=PF))
    pf1, old = specs.systems["pf1"], specs.systems["old"]
    assert pf1.postfix_dovecot is not None and old.imap is not None
    options = pf1.postfix_dovecot
    assert options.state_dir == str(here / "pf1" / "mailferry")
    assert (options.postfix_config_dir, options.mail_root) == ("/etc/postfix-pf1", "/srv/mail/pf1")
    assert options.host is None and options.tables_folder == options.state_dir
    assert options.smtp == Endpoint("127.0.0.1", 10025) and pf1.submission == options.smtp
    assert options.mail_user == "vmail" and options.imap_tls == "none"
    assert options.imap_cafile is None and old.imap.cafile is None  # the system's roots
    assert options.master.password == SecretRef(env="PF1_MASTER_PASSWORD")
    assert old.imap.passwords == SecretRef(file=str(here / "secrets" / "old-passwords"))
    assert old.imap.tls == "implicit" and old.imap.login == "per-user" and old.lmtp is None
    drivers = make_drivers(specs)
    assert isinstance(drivers["pf1"], PostfixDovecotDriver)
    assert isinstance(drivers["old"], ImapDriver)
    assert drivers["pf1"].delivery_endpoint().protocol == "smtp"
    assert drivers["pf1"].wanted_postfix()["relayhost"] == "[127.0.0.1]:2525"


def test_private_ca_files_resolve_against_the_specs_folder(here: Path) -> None:
    text = PF.replace("    imap: 127.0.0.1:10143\n", "    imap: 127.0.0.1:10143\n"
                      "    imapTls: starttls\n    imapCaFile: pki/private-ca.pem\n")
    text = text.replace("    stateDir: old-state\n", "    stateDir: old-state\n"
                        "    caFile: /etc/ssl/old-ca.pem\n")
    specs = load_specs(write_set(here, real_yaml=text))
    pf1, old = specs.systems["pf1"].postfix_dovecot, specs.systems["old"].imap
    assert pf1 is not None and old is not None
    assert pf1.imap_tls == "starttls" and pf1.imap_cafile == str(here / "pki" / "private-ca.pem")
    assert old.cafile == "/etc/ssl/old-ca.pem"


def test_literal_password_is_refused_and_never_echoed(here: Path) -> None:
    text = PF.replace("password: {env: PF1_MASTER_PASSWORD}", "password: hunter2")
    found = problems_of(write_set(here, real_yaml=text))
    assert any("real.yaml:15: spec.postfixDovecot.masterUser.password:" in p
               and "never write the password" in p for p in found), found
    assert "hunter2" not in "\n".join(found)


def test_settings_of_the_wrong_driver_and_missing_settings(here: Path) -> None:
    text = PF.replace("  driver: postfix-dovecot", "  driver: imap")
    assert problems_of(write_set(here, real_yaml=text)) == [
        "real.yaml:5: spec.imap: required field missing"]
    text = PF.replace("  postfixDovecot:\n", "  maildir: {root: x, lmtp: h:1, submission: h:2}\n"
                      "  postfixDovecot:\n")
    found = problems_of(write_set(here, real_yaml=text))
    assert found == ["real.yaml:7: spec.maildir: settings of another driver: driver is "
                     "'postfix-dovecot', which reads spec.postfixDovecot"], found


def test_master_login_needs_its_master_user(here: Path) -> None:
    text = PF.replace("    login: per-user\n    passwords: {file: secrets/old-passwords}\n", "")
    found = problems_of(write_set(here, real_yaml=text))
    assert found == ["real.yaml:24: spec.imap.masterUser: required field missing "
                     "(login: master)"], found


REMOTE = PF.replace("    stateDir: pf1/mailferry\n", "    stateDir: pf1/mailferry\n"
                    "    host: ssh://vmadmin@mail1.example:2222\n"
                    "    tablesDir: /srv/mail/pf1/mailferry\n"
                    "    sshIdentityFile: keys/id_ed25519\n"
                    "    sshKnownHostsFile: keys/known_hosts\n")


def test_a_remote_host_loads_with_its_ssh_settings(here: Path) -> None:
    specs = load_specs(write_set(here, real_yaml=REMOTE))
    options = specs.systems["pf1"].postfix_dovecot
    assert options is not None and options.host is not None
    assert options.host.url == "ssh://vmadmin@mail1.example:2222"
    assert options.host.identity_file == str(here / "keys" / "id_ed25519")
    assert options.host.known_hosts_file == str(here / "keys" / "known_hosts")
    assert options.state_dir == str(here / "pf1" / "mailferry")  # the database stays here
    assert options.tables_folder == "/srv/mail/pf1/mailferry"  # the tables go to the host
    driver = make_drivers(specs)["pf1"]
    assert isinstance(driver, PostfixDovecotDriver)
    assert driver.host.label == "ssh://vmadmin@mail1.example:2222"  # nothing connected yet
    assert driver.wanted_postfix()["virtual_alias_maps"] == \
        "hash:/srv/mail/pf1/mailferry/virtual_alias"
    default_port = REMOTE.replace("mail1.example:2222", "mail1.example")
    options = load_specs(write_set(here, real_yaml=default_port)).systems["pf1"].postfix_dovecot
    assert options is not None and options.host is not None and options.host.port == 22


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("ssh://vmadmin@mail1.example:2222", "mail1.example:22",
     "real.yaml:9: spec.postfixDovecot.host: must be ssh://user@host:port"),
    ("ssh://vmadmin@mail1.example:2222", "ssh://vmadmin@mail1.example:70000",
     "real.yaml:9: spec.postfixDovecot.host: port is outside 1-65535"),
    ("    postfixConfigDir: /etc/postfix-pf1", "    postfixConfigDir: etc/postfix-pf1",
     "real.yaml:13: spec.postfixDovecot.postfixConfigDir: 'etc/postfix-pf1' is a path on the "
     "host (spec.postfixDovecot.host): it must be absolute"),
    ("    tablesDir: /srv/mail/pf1/mailferry\n", "",
     "real.yaml:7: spec.postfixDovecot: required field missing: tablesDir"),
    ("    host: ssh://vmadmin@mail1.example:2222\n", "",
     "real.yaml:9: spec.postfixDovecot.tablesDir: only with host (ssh://...)"),
])
def test_remote_host_mistakes_give_file_and_line(here: Path, old: str, new: str,
                                                 expected: str) -> None:
    found = problems_of(write_set(here, real_yaml=REMOTE.replace(old, new)))
    assert any(p.startswith(expected) for p in found), found


def test_alias_candidates_with_adopt_only(here: Path) -> None:
    with_list = PF.replace("    stateDir: pf1/mailferry\n", "    stateDir: pf1/mailferry\n"
                           "    aliasCandidates: pf1/aliases.txt\n")
    found = problems_of(write_set(here, real_yaml=with_list))
    assert found == ["real.yaml:9: spec.postfixDovecot.aliasCandidates: only with adopt: "
                     "true (the addresses to ask the admin's alias maps mailferry cannot "
                     "list)"], found
    adopted = with_list.replace("    aliasCandidates:", "    adopt: true\n    aliasCandidates:")
    options = load_specs(write_set(here, real_yaml=adopted)).systems["pf1"].postfix_dovecot
    assert options is not None and options.alias_candidates == str(here / "pf1/aliases.txt")


def test_passwords_file_format() -> None:
    text = "# comment\n\nFrank@Corp.example  pw with spaces \nbad-line\n"
    assert read_passwords(text) == {"frank@corp.example": "pw with spaces"}


OAUTH = PF.replace("""    login: per-user
    passwords: {file: secrets/old-passwords}
""", """    login: oauth2
    oauth2:
      tokenUrl: https://login.microsoftonline.com/tenant/oauth2/v2.0/token
      clientId: 0c0ffee0-app
      clientSecret: {env: OLD_OAUTH_SECRET}
      refreshTokens: {file: secrets/old-refresh-tokens}
      scope: https://outlook.office.com/IMAP.AccessAsUser.All offline_access
""")


def test_oauth2_login_loads_with_references(here: Path) -> None:
    old = load_specs(write_set(here, real_yaml=OAUTH)).systems["old"].imap
    assert old is not None and old.login == "oauth2" and old.oauth2 is not None
    o = old.oauth2
    assert o.grant == "refresh_token" and o.mechanism == "xoauth2" and o.refresh_token is None
    assert o.client_secret == SecretRef(env="OLD_OAUTH_SECRET")
    assert o.refresh_tokens == SecretRef(file=str(here / "secrets" / "old-refresh-tokens"))


@pytest.mark.parametrize(("change", "expected"), [
    (("login: oauth2\n    oauth2:\n", "login: per-user\n    passwords: {file: p}\n    oauth2:\n"),
     "real.yaml:27: spec.imap.oauth2: only with login: oauth2 (login is 'per-user')"),
    (("      refreshTokens: {file: secrets/old-refresh-tokens}\n", ""),
     "real.yaml:26: spec.imap.oauth2: grant refresh_token needs one of refreshToken (one "
     "for every mailbox) or refreshTokens (a file of 'address token' lines)"),
    (("tokenUrl: https://login", "tokenUrl: http://login"),
     "real.yaml:27: spec.imap.oauth2.tokenUrl: must be https:// (the client secret and the "
     "tokens travel in it); http:// only for 127.0.0.1 or localhost"),
    (("      scope:", "      grant: client_credentials\n      scope:"),
     "real.yaml:30: spec.imap.oauth2.refreshTokens: only with grant: refresh_token"),
    (("      scope:", "      mechanism: plain\n      scope:"),
     "real.yaml:31: spec.imap.oauth2.mechanism: 'plain' is not one of"),
    (("clientSecret: {env: OLD_OAUTH_SECRET}", "clientSecret: s3cr3t-literal"),
     "real.yaml:29: spec.imap.oauth2.clientSecret: must be {env: VARIABLE} or {file: path}; "
     "never write the client secret itself in the specs"),
])
def test_bad_oauth2_settings_name_file_and_line(here: Path, change: tuple[str, str],
                                                expected: str) -> None:
    found = problems_of(write_set(here, real_yaml=OAUTH.replace(*change)))
    assert len(found) == 1 and found[0].startswith(expected), found
    assert "s3cr3t-literal" not in found[0]


def test_direct_maildir_writes_only_where_dovecot_runs_here(here: Path) -> None:
    """`directMaildirWrites` loads on a system of this machine (the driver then names its
    Dovecot configuration to the mover); with a remote host it is refused at its line."""
    local = PF.replace("    stateDir: pf1/mailferry\n", "    stateDir: pf1/mailferry\n"
                       "    directMaildirWrites: true\n")
    driver = make_drivers(load_specs(write_set(here, real_yaml=local)))["pf1"]
    assert isinstance(driver, PostfixDovecotDriver)
    assert driver.dovecot_direct_config() == "/etc/dovecot-pf1/dovecot.conf"
    plain = make_drivers(load_specs(write_set(here, real_yaml=PF)))["pf1"]
    assert isinstance(plain, PostfixDovecotDriver) and plain.dovecot_direct_config() is None
    remote = REMOTE.replace("    tablesDir:", "    directMaildirWrites: true\n    tablesDir:")
    found = problems_of(write_set(here, real_yaml=remote))
    assert found == ["real.yaml:10: spec.postfixDovecot.directMaildirWrites: only when "
                     "Postfix and Dovecot run on the reconciler's machine (no host:): the "
                     "mover writes the Maildir files itself"], found
