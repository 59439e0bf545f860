"""Two Postfix + Dovecot hosts in two network namespaces, administered over SSH (issue 16).

The world (`tests/netns.py`): hosts ``pfa`` and ``pfb``, each an ``ip netns`` with its own
address (10.77.N.2), its own sshd, Postfix and Dovecot; the reconciler, fed and the load
generator in the root namespace. The specs give each system ``host: ssh://root@10.77.N.2:22``
with the reconciler's key and a known_hosts file; the driver's account database lives on
the reconciler's side (``stateDir``), the tables it renders in ``tablesDir`` on the host,
and every command and file write goes through SSH. What is proved:

- ten mailboxes move pfa -> pfb while mail flows through fed (outside senders) and into
  both Postfixes (their local users): every acknowledged message found exactly once, in the
  mailbox its address lives in (lost 0, duplicated 0, misplaced 0); the old mail on pfb is
  byte-identical to what pfa held; an SSH connection dropped in the middle of a table write
  on pfb during the wave is an error naming the host and the command, which the engine
  retries;
- the same drop at the driver: the step fails, nothing is committed, the retry completes;
- a host key that does not match known_hosts refuses before any change: the host's
  configuration and tables byte-identical, no account in the database.

TLS is required on every hop (a private CA, `tests/netns.py`): the reconciler's IMAP to
Dovecot (``imapTls: starttls``), fed's deliveries to Postfix and the driver's checks of
Postfix and Dovecot LMTP (``smtpTls: starttls``), Postfix's relay to fed and its hand-off
to Dovecot LMTP. Proved from the servers' own logs that the move's mail went over TLS;
a CA that did not sign the host's certificate fails naming the system and the hop with
nothing changed; plaintext is refused by the servers and by fed's client.

A non-root SSH user with ``sshSudo`` and a sudoers drop-in (the namespace's own, see
`tests/netns.py`): a missing rule fails naming the command and the rule, nothing changed;
with the rules a mailbox is created and deleted end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import imaplib
import os
import pwd
import re
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fed.delivery.smtpclient import ClientError, Connection
from mailferry.mail.tls import client_context
from reconciler.drivers.base import mailbox_id_for
from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver
from reconciler.drivers.sshhost import SshHost, close_shared_hosts
from reconciler.errors import TemporaryError

from helpers import mail
from helpers.pki import make_ca
from netns import SUDO_UID, SUDO_USER, WHY_NOT, NetnsWorld
from waves import Load, account, collect, drain, run_wave
from world import placement, policy, run_cli

pytestmark = pytest.mark.timeout(420)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"two hosts in network namespaces unavailable: {WHY_NOT}",
                allow_module_level=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsWorld]:
    w = NetnsWorld(tmp_path_factory.mktemp("netns"))
    yield w
    w.stop()


def file_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` but logs and runtime state."""
    skip = {"maillog", "dovecot.log", "stderr.log", "sshd.log"}
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip and "run" not in p.parts}


def test_the_driver_works_on_the_host_only_through_ssh(world: NetnsWorld,
                                                       tmp_path: Path) -> None:
    engine = world.engine(world.base_dir, f"sqlite:///{tmp_path / 'state.db'}")
    driver = engine.drivers["pfb"]
    assert isinstance(driver, PostfixDovecotDriver) and isinstance(driver.host, SshHost)
    driver.ping()  # configures main.cf over SSH
    host = world.hosts["pfb"]
    main_cf = (host.postfix_dir / "main.cf").read_text()
    assert f"relayhost = [{world.fed_host}]:{world.fed_port}" in main_cf
    assert f"virtual_alias_maps = hash:{host.state_dir}/virtual_alias" in main_cf
    driver.create_mailbox("tab=corp.example", internal_address="tab@pfb.internal",
                          access_addresses=("tab@corp.example",))
    assert "tab@corp.example\ttab=corp.example@pfb.invalid" in \
        (host.state_dir / "virtual_alias").read_text()
    assert "tab=corp.example:" in (host.state_dir / "passwd").read_text()
    # The database stays with the reconciler, the tables go to the host.
    local = sorted(p.name for p in world.state_dir("pfb").iterdir())
    assert "mailferry.db" in local and not {"passwd", "virtual_alias"} & set(local)
    assert host.doveadm("user", "tab=corp.example")  # Dovecot on the host sees the user
    # One multiplexed connection: the master is still the same process after many commands.
    pid = driver.host.master_pid()
    driver.set_redirect("tab=corp.example", "tab=corp.example@pfa.invalid")
    driver.set_redirect("tab=corp.example", None)
    assert pid is not None and driver.host.master_pid() == pid
    driver.delete_mailbox("tab=corp.example")
    assert not (host.root / "mail" / "tab=corp.example").exists()


def test_a_host_key_not_in_known_hosts_refuses_before_any_change(world: NetnsWorld,
                                                                tmp_path: Path) -> None:
    other = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, timeout=30)
    wrong = tmp_path / "known_hosts"
    ns = world.ns["pfb"]
    pub = (tmp_path / "impostor.pub").read_text().split()
    wrong.write_text(f"{ns.address} {pub[0]} {pub[1]}\n")
    host = world.hosts["pfb"]
    roots = (host.postfix_dir, host.dovecot_conf.parent, host.state_dir)
    before = file_hashes(*roots)
    saved = list(world.base)
    try:
        world.base[2] = world.system_document("pfb", known_hosts=wrong)
        specs = world.write(tmp_path / "specs", [policy("p", deleteSource="never"), placement(
            "k", "pfb", [{"address": "key@corp.example"}], policy_name="p")])
        state = f"sqlite:///{tmp_path / 'state.db'}"
        result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
        assert result.returncode == 1, result.stdout
        assert f"ssh://root@{ns.address}:22: ssh connection failed" in result.stdout
        assert "Host key verification failed" in result.stdout, result.stdout
    finally:
        world.base[:] = saved
    assert file_hashes(*roots) == before  # not one byte changed on the host
    engine = world.engine(world.base_dir, f"sqlite:///{tmp_path / 'state.db'}")
    assert engine.drivers["pfb"].get_account(mailbox_id_for("key@corp.example")) is None


def test_a_connection_dropped_mid_write_commits_nothing_and_the_retry_completes(
        world: NetnsWorld, tmp_path: Path) -> None:
    engine = world.engine(world.base_dir, f"sqlite:///{tmp_path / 'state.db'}")
    driver = engine.drivers["pfb"]
    assert isinstance(driver, PostfixDovecotDriver)
    driver.ping()
    host = world.hosts["pfb"]
    alias = host.state_dir / "virtual_alias"
    before = (alias.read_bytes(), Path(f"{alias}.db").read_bytes())
    marker = world.ns["pfb"].arm_connection_drop()
    box = "drop=corp.example"
    with pytest.raises(TemporaryError) as caught:
        driver.create_mailbox(box, internal_address="drop@pfb.internal",
                              access_addresses=("drop@corp.example",))
    message = str(caught.value)
    assert f"ssh://root@{world.ns['pfb'].address}:22: ssh connection lost" in message
    assert "postmap" in message or "replace" in message, message
    assert not marker.exists()  # the drop really happened in the postmap on the host
    assert driver.get_account(box) is None  # nothing committed
    assert (alias.read_bytes(), Path(f"{alias}.db").read_bytes()) == before
    driver.create_mailbox(box, internal_address="drop@pfb.internal",
                          access_addresses=("drop@corp.example",))  # reconnects
    assert driver.get_account(box) is not None
    assert "drop@corp.example\tdrop=corp.example@pfb.invalid" in alias.read_text()
    driver.delete_mailbox(box)


def test_ten_mailboxes_move_between_the_hosts_while_mail_flows(world: NetnsWorld,
                                                               tmp_path: Path) -> None:
    addresses = [f"r{n:02d}@corp.example" for n in range(1, 11)]
    anchors = {"stay.a@corp.example": "pfa", "stay.b@corp.example": "pfb"}
    layout = {**dict.fromkeys(addresses, "pfa"), **anchors}
    pol = policy("remote", deleteSource={"after": "0s", "consent": True}, diary=False)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    run_wave(world, tmp_path / "specs-0", state, layout, pol)
    engine = world.engine(tmp_path / "specs-0", state)
    source = engine.drivers["pfa"]
    old: dict[str, dict[str, str]] = {}  # address -> Message-ID -> sha256, as pfa holds it
    for address in addresses:
        box = mailbox_id_for(address)
        for n, folder in enumerate(("INBOX", "INBOX", "Sent")):
            data = mail.message(f"old {n}", f"<old{n}.{box}@corp.example>", sender=
                                "x@outside.example", to=address)
            source.append_message(box, folder, data, flags="S",
                                  internal_date=1_600_000_000.0 + n)
        old[address] = {m.message_id or "": m.sha256 for folder in source.list_folders(box)
                        for m in source.list_messages(box, folder)}
    everyone = sorted(layout)
    load = Load(world.fed_port, {n: h.smtp_port for n, h in world.hosts.items()},
                lambda: everyone, fed_rate=20, local_rate=10, limit=300,
                fed_host=world.fed_host,
                local_hosts={n: h.address for n, h in world.hosts.items()},
                local_tls=client_context(str(world.ca))).start()
    errors: list[str] = []
    marker = world.ns["pfb"].arm_connection_drop()  # at pfb's first table write of the wave
    try:
        layout.update(dict.fromkeys(addresses, "pfb"))
        run_wave(world, tmp_path / "specs-1", state, layout, pol, log=errors.append)
    finally:
        load.stop()
    engine = world.engine(tmp_path / "specs-1", state)
    drain(engine, world.hosts.values())
    result = account(load.acked, collect(world.hosts, everyone),
                     lambda rcpt: f"{layout[rcpt]}/{rcpt}")
    print(result.line(0))
    assert result.acknowledged > 100 and not load.refused, load.refused[:5]
    assert (result.lost, result.duplicated, result.misplaced) == ([], [], []), result.line(0)
    assert not marker.exists()
    url = f"ssh://root@{world.ns['pfb'].address}:22"
    assert any(f"{url}: ssh connection lost" in e for e in errors), errors
    target = engine.drivers["pfb"]
    for address in addresses:  # old mail byte-identical on the other host
        box = mailbox_id_for(address)
        moved = {m.message_id or "": m.sha256 for folder in target.list_folders(box)
                 for m in target.list_messages(box, folder)}
        assert {mid: moved.get(mid) for mid in old[address]} == old[address]
        assert engine.drivers["pfa"].get_account(box) is None  # deleted on the source
    assert_the_mail_went_over_tls(world)


def assert_the_mail_went_over_tls(world: NetnsWorld) -> None:
    """Every hop of the move's mail, from the servers' logs (not their configuration)."""
    imap_logins = 0
    for name, host in world.hosts.items():
        log = host.maillog()
        # fed -> Postfix and the local senders: smtpd took mail only after STARTTLS
        # (smtpd_tls_security_level = encrypt), each session logged as TLS.
        assert re.search(r"TLS connection established from \S+: TLSv1\.[23]", log), name
        # Postfix -> fed: verified against the private CA.
        assert f"Trusted TLS connection established to {world.fed_host}[{world.fed_host}]:" \
            f"{world.fed_port}" in log, name
        # Postfix -> Dovecot LMTP on the host.
        assert re.search(rf"TLS connection established to {re.escape(host.address)}"
                         rf"\[{re.escape(host.address)}\]:{host.lmtp_port}", log), name
        assert "status=sent" in log and "Must issue a STARTTLS" not in log, name
        dovecot = (host.root / "dovecot" / "dovecot.log").read_text(errors="replace")
        logins = [line for line in dovecot.splitlines() if "imap-login: Info: Login:" in line]
        assert logins and all(", TLS" in line for line in logins), name
        imap_logins += len(logins)
    assert imap_logins > 10


def test_a_ca_that_did_not_sign_the_host_fails_naming_the_system_and_hop(
        world: NetnsWorld, tmp_path: Path) -> None:
    other_ca = make_ca(tmp_path / "other-pki")
    host = world.hosts["pfb"]
    roots = (host.postfix_dir, host.dovecot_conf.parent, host.state_dir)
    before = file_hashes(*roots)
    saved = list(world.base)
    try:
        world.base[2] = world.system_document("pfb", ca_file=other_ca)
        specs = world.write(tmp_path / "specs", [policy("p", deleteSource="never"), placement(
            "c", "pfb", [{"address": "ca@corp.example"}], policy_name="p")])
        state = f"sqlite:///{tmp_path / 'state.db'}"
        result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
    finally:
        world.base[:] = saved
    assert result.returncode == 1, result.stdout
    hop = f"pfb: Postfix SMTP {host.address}:{host.smtp_port}: TLS handshake failed: " \
        "certificate verify failed"
    assert hop in result.stdout, result.stdout
    assert file_hashes(*roots) == before  # nothing changed on the host
    engine = world.engine(world.base_dir, f"sqlite:///{tmp_path / 'state.db'}")
    assert engine.drivers["pfb"].get_account(mailbox_id_for("ca@corp.example")) is None


def test_plaintext_is_refused_where_tls_is_required(world: NetnsWorld) -> None:
    host = world.hosts["pfb"]
    # Postfix takes no mail in cleartext ...
    with smtplib.SMTP(host.address, host.smtp_port, timeout=10) as smtp:
        smtp.ehlo("plain.test")
        code, said = smtp.mail("x@outside.example")
        assert code == 530 and b"STARTTLS" in said, (code, said)
    # ... Dovecot logs no one in without TLS ...
    imap = imaplib.IMAP4(host.address, host.imap_port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"(?i)plaintext|TLS"):
            imap.login("master", host.master_password)
    finally:
        imap.shutdown()
    # ... and fed's client, told TLS is required, refuses a server that does not offer it
    # (the embedded maildir system's LMTP: plaintext only) before sending anything.
    lmtp = world.base[0]["spec"]["maildir"]["lmtp"]
    address, port = lmtp.rsplit(":", 1)

    async def attempt() -> str:
        with pytest.raises(ClientError) as caught:
            await Connection.open(address, int(port), True, "fed.test", 10, tls="starttls")
        return str(caught.value)

    refusal = asyncio.run(attempt())
    assert "TLS required but the server offers no STARTTLS; nothing sent in cleartext" in refusal
    assert lmtp in refusal


def sudoers(host_dir: Path, postfix_dir: Path, dovecot_conf: Path, mail_root: Path, *,
            reload: bool = True) -> str:
    """The drop-in of docs/postfix-dovecot.md ("A non-root user with sudo"), for this host."""
    lines = [f"{SUDO_USER} ALL=(root) NOPASSWD: /usr/sbin/postconf -c {postfix_dir} *",
             f"{SUDO_USER} ALL=(root) NOPASSWD: /usr/bin/doveadm -c {dovecot_conf} *",
             f"{SUDO_USER} ALL=(root) NOPASSWD: /usr/bin/doveconf -c {dovecot_conf} *",
             f"{SUDO_USER} ALL=(root) NOPASSWD: /usr/sbin/postqueue -c {postfix_dir} -j",
             f"{SUDO_USER} ALL=(vmail) NOPASSWD: /usr/bin/rm -rf -- {mail_root}/*"]
    if reload:
        lines.append(f"{SUDO_USER} ALL=(root) NOPASSWD: /usr/sbin/postfix -c {postfix_dir} reload")
    return "\n".join(lines) + "\n"


def test_a_non_root_user_with_sudo_administers_the_host(world: NetnsWorld,
                                                        tmp_path: Path) -> None:
    """ssh://mferry@... with sshSudo: a missing sudoers rule fails naming the command and the
    rule, main.cf and the tables untouched; with the rules, a mailbox is created and deleted
    end to end, every privileged command through sudo -n, the home removed as vmail."""
    ns, host = world.ns["pfa"], world.hosts["pfa"]
    mail_root = host.root / "mail"
    for path in [host.state_dir, *host.state_dir.iterdir()]:  # the admin: tablesDir is hers
        os.chown(path, SUDO_UID, SUDO_UID)
    main_cf = host.postfix_dir / "main.cf"
    # The admin changed relayhost: mailferry's next configuration must put it back (a
    # postconf -e and a postfix reload, both privileged).
    subprocess.run(["postconf", "-c", str(host.postfix_dir), "-e", "relayhost="], check=True)
    saved = list(world.base)
    try:
        world.base[1] = world.system_document("pfa", sudo=True)
        specs = world.write(tmp_path / "specs", [policy("p", deleteSource="never"), placement(
            "s", "pfa", [{"address": "sudo@corp.example"}], policy_name="p")])
        state = f"sqlite:///{tmp_path / 'state.db'}"
        ns.grant(sudoers(host.root, host.postfix_dir, host.dovecot_conf, mail_root,
                         reload=False))
        before = file_hashes(host.postfix_dir, host.state_dir)
        result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
        assert result.returncode == 1, result.stdout
        url = f"ssh://{SUDO_USER}@{ns.address}:22"
        assert f"pfa: not allowed on {url}, nothing changed: postfix -c {host.postfix_dir} " \
            f"reload (sudoers: {SUDO_USER} ALL=(root) NOPASSWD: /usr/sbin/postfix -c " \
            f"{host.postfix_dir} reload)" in result.stdout, result.stdout
        assert file_hashes(host.postfix_dir, host.state_dir) == before  # nothing half-applied
        assert "relayhost =" in main_cf.read_text()

        ns.grant(sudoers(host.root, host.postfix_dir, host.dovecot_conf, mail_root))
        state = f"sqlite:///{tmp_path / 'state-2.db'}"  # not waiting out the failed try's delay
        result = run_cli("--specs", str(specs), "--state", state, "--apply", cwd=tmp_path)
        assert result.returncode == 0, result.stdout
        assert "created on pfa" in result.stdout
        assert f"relayhost = [{world.fed_host}]:{world.fed_port}" in main_cf.read_text()
        box = mailbox_id_for("sudo@corp.example")
        assert f"{box}:" in (host.state_dir / "passwd").read_text()
        assert host.doveadm("user", box)
        passwd = host.state_dir / "passwd"
        assert passwd.stat().st_uid == SUDO_UID  # written as the user, not through sudo
        engine = world.engine(specs, state)
        driver = engine.drivers["pfa"]
        assert isinstance(driver, PostfixDovecotDriver)
        driver.append_message(box, "INBOX", mail.message("s", "<sudo.1@corp.example>",
                                                         to="sudo@corp.example"))
        home = mail_root / box
        assert home.exists() and home.stat().st_uid == pwd.getpwnam("vmail").pw_uid
        driver.delete_mailbox(box)  # sudo -n -u vmail rm -rf -- HOME
        assert not home.exists() and driver.get_account(box) is None
        sessions = (ns.root / "ssh" / "sshd.log").read_text(errors="replace")
        assert f"Accepted publickey for {SUDO_USER}" in sessions
    finally:
        world.base[:] = saved
        close_shared_hosts()
        for path in [host.state_dir, *host.state_dir.iterdir()]:
            os.chown(path, 0, 0)
