"""fed's acceptance policy: address comparison, no open relay, SMTP AUTH and STARTTLS."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fed.smtp.auth import hash_password, load_credentials, verify_password

from fedraw import Raw
from fedutil import REPO, FakeSystem, Fed, message, send
from helpers.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery staple"


@pytest.fixture
def s1() -> Iterator[FakeSystem]:
    system = FakeSystem("s1").start()
    yield system
    system.stop()


def start(tmp_path: Path, s1: FakeSystem, extra: list[str] | None = None,
          name: str = "fed") -> Fed:
    running = Fed(tmp_path / name, [s1], extra=extra).start()
    running.client.put_entry("a@corp.example", s1.physical("a"))
    return running


LOOPBACK_RELAY = ["--relay-network", "127.0.0.0/8", "--relay-network", "::1/128"]


@pytest.fixture
def fed(tmp_path: Path, s1: FakeSystem) -> Iterator[Fed]:
    running = start(tmp_path, s1, LOOPBACK_RELAY)
    yield running
    running.kill()


def rcpt_reply(port: int, sender: str, rcpt: str, login: tuple[str, str] | None = None
               ) -> tuple[int, str]:
    """(code, text) of RCPT after MAIL FROM `sender` (optionally after AUTH)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("tester.example")
        if login:
            client.login(*login)
        code, text = client.mail(sender)
        assert code == 250, text
        code, text = client.rcpt(rcpt)
        return code, text.decode()


def non_loopback_ip() -> str | None:
    """An address of this host outside 127/8 (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = str(sock.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


# -- addresses -----------------------------------------------------------------------

def test_local_part_and_domain_are_matched_case_insensitively(fed: Fed, s1: FakeSystem
                                                               ) -> None:
    for n, rcpt in enumerate(["A@CORP.EXAMPLE", "a@Corp.Example", "A@corp.example"]):
        code, reply = send(fed.smtp_port, [rcpt], message("case", f"c{n}@t"))
        assert code == 250, reply
    wait_for(lambda: len(s1.received) == 3, what="three deliveries")
    assert {r for m in s1.received for r in m.rcpts} == {"a@s1.invalid"}
    code, reply = send(fed.smtp_port, ["NoBody@CORP.example"], b"x\r\n")
    assert (code, reply) == (550, "5.1.1 <nobody@corp.example>: user unknown in directory")


def test_case_sensitive_local_parts_switch(tmp_path: Path, s1: FakeSystem) -> None:
    running = Fed(tmp_path / "fed", [s1], extra=["--case-sensitive-local"]).start()
    try:
        entry = running.client.put_entry("Jean@CORP.Example", s1.physical("jean"))
        assert entry.address == "Jean@corp.example"  # domain folded, local part kept
        code, reply = send(running.smtp_port, ["jean@corp.example"], b"x\r\n")
        assert (code, reply) == (550, "5.1.1 <jean@corp.example>: user unknown in directory")
        code, reply = send(running.smtp_port, ["Jean@Corp.EXAMPLE"], message("cs", "cs@t"))
        assert code == 250, reply
        wait_for(lambda: s1.ids() == ["<cs@t>"], what="delivery")
    finally:
        running.kill()


# -- relaying ------------------------------------------------------------------------

def test_relay_only_for_the_systems_own_senders_from_the_relay_networks(fed: Fed,
                                                                        s1: FakeSystem) -> None:
    denied = (550, "5.7.1 <friend@elsewhere.example>: relaying denied")
    # Anyone else, from anywhere: denied, even claiming one of fed's domains.
    assert rcpt_reply(fed.smtp_port, "x@outside.example", "friend@elsewhere.example") == denied
    assert rcpt_reply(fed.smtp_port, "nobody@corp.example", "friend@elsewhere.example") \
        == denied
    # A system's own address (any case), a physical address, the null sender: from
    # loopback, named a relay network here, they may relay.
    for sender in ("a@corp.example", "A@Corp.Example", s1.physical("a"), "<>"):
        assert rcpt_reply(fed.smtp_port, sender, "Friend@Elsewhere.example")[0] == 250, sender
    # The relayed recipient keeps its local part as written (only the domain is folded).
    with smtplib.SMTP("127.0.0.1", fed.smtp_port, timeout=20) as client:
        client.sendmail("a@corp.example", ["Friend@Elsewhere.EXAMPLE"],
                        message("out", "out@t"))
    rows = wait_for(lambda: fed.client.deliveries(), what="a delivery attempt")
    assert rows[0].rcpt == "Friend@elsewhere.example"


def test_a_local_sender_from_outside_the_relay_networks_is_denied(tmp_path: Path,
                                                                  s1: FakeSystem) -> None:
    """No relay network unless named: not even loopback (any local process could forge a
    directory sender), so the default is like 'none'."""
    for networks in (["--relay-network", "10.0.0.0/8", "--relay-network", "fd00::/8"],
                     ["--relay-network", "none"], []):
        running = start(tmp_path, s1, networks, name=f"fed{len(networks)}")
        try:
            assert rcpt_reply(running.smtp_port, "a@corp.example", "friend@elsewhere.example") \
                == (550, "5.7.1 <friend@elsewhere.example>: relaying denied")
            # Local delivery is not relaying: still accepted.
            assert rcpt_reply(running.smtp_port, "x@outside.example", "a@corp.example")[0] \
                == 250
        finally:
            running.kill()


# -- AUTH ------------------------------------------------------------------------------

def write_auth_file(tmp_path: Path) -> Path:
    made = subprocess.run([sys.executable, "-m", "fed", "auth-hash"], input=PASSWORD + "\n",
                          capture_output=True, text=True, cwd=REPO, timeout=30, check=True)
    path = tmp_path / "smtp-users"
    path.write_text(f"# relay users\nrelay-user:{made.stdout.strip()}\n")
    return path


def test_credentials_file_and_hashes(tmp_path: Path) -> None:
    stored = hash_password("s3cret")
    assert verify_password(b"s3cret", stored) and not verify_password(b"s3cret!", stored)
    assert not verify_password(b"s3cret", "scrypt$bad")
    users = load_credentials(write_auth_file(tmp_path))
    assert list(users) == ["relay-user"] and verify_password(PASSWORD.encode(),
                                                             users["relay-user"])
    bad = tmp_path / "bad"
    bad.write_text("user:plaintext\n")
    result = subprocess.run(
        [sys.executable, "-m", "fed", "serve", "--state-dir", str(tmp_path / "x"),
         "--token-env", "PATH", "--domain", "corp.example", "--auth-file", str(bad)],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 2 and "bad:1" in result.stderr


def test_authenticated_clients_may_relay_on_loopback(tmp_path: Path, s1: FakeSystem) -> None:
    auth = write_auth_file(tmp_path)
    running = start(tmp_path, s1, ["--auth-file", str(auth), "--relay-network", "none"])
    try:
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=20) as client:
            client.ehlo("t")
            assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login("relay-user", "wrong")
            assert refused.value.smtp_code == 535
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("nobody", PASSWORD)
        assert rcpt_reply(running.smtp_port, "x@outside.example", "friend@elsewhere.example",
                          ("relay-user", PASSWORD))[0] == 250
        assert rcpt_reply(running.smtp_port, "x@outside.example",
                          "friend@elsewhere.example")[0] == 550
        with Raw(running.smtp_port) as raw:  # AUTH LOGIN by hand, then relay
            assert raw.cmd(b"EHLO t")[:3] == b"250"
            assert raw.cmd(b"AUTH LOGIN")[:3] == b"334"
            assert raw.cmd(base64.b64encode(b"relay-user"))[:3] == b"334"
            assert raw.cmd(base64.b64encode(PASSWORD.encode()))[:3] == b"235"
            assert raw.cmd(b"MAIL FROM:<x@outside.example>")[:3] == b"250"
            assert raw.cmd(b"RCPT TO:<friend@elsewhere.example>")[:3] == b"250"
    finally:
        running.kill()


def test_no_auth_offered_without_a_credentials_file(fed: Fed) -> None:
    with Raw(fed.smtp_port) as raw:
        raw.send(b"EHLO t\r\n")
        assert not any(b"AUTH" in line for line in raw.lines())
        assert raw.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p"))[:3] == b"504"


# -- STARTTLS --------------------------------------------------------------------------

def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=fed.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_starttls_and_auth_only_after_it_off_loopback(tmp_path: Path, s1: FakeSystem) -> None:
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    cert, key = self_signed(tmp_path)
    auth = write_auth_file(tmp_path)
    running = start(tmp_path, s1, ["--smtp", "0.0.0.0:0", "--tls-cert", str(cert),
                                   "--tls-key", str(key), "--auth-file", str(auth),
                                   "--relay-network", "none"])
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with smtplib.SMTP(ip, running.smtp_port, timeout=20) as client:
            client.ehlo("t")
            assert client.has_extn("starttls") and not client.has_extn("auth")
            code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(
                b"\0relay-user\0" + PASSWORD.encode()).decode())
            assert code == 538, text  # never a password in clear over the network
            client.starttls(context=context)
            client.ehlo("t")
            assert client.has_extn("auth") and not client.has_extn("starttls")
            client.login("relay-user", PASSWORD)
            client.sendmail("x@outside.example", ["a@corp.example"], message("tls", "tls@t"))
        got = wait_for(lambda: list(s1.received), what="delivery")[0]
        assert b"with ESMTPSA id" in got.data
    finally:
        running.kill()


def test_password_guessing_is_throttled_per_client(tmp_path: Path, s1: FakeSystem) -> None:
    auth = write_auth_file(tmp_path)
    running = start(tmp_path, s1, ["--auth-file", str(auth), "--auth-max-failures", "3"])

    def plain(password: str) -> bytes:
        return b"AUTH PLAIN " + base64.b64encode(b"\0relay-user\0" + password.encode())

    try:
        with Raw(running.smtp_port) as raw:
            raw.send(b"EHLO t\r\n")
            raw.lines()
            assert raw.cmd(plain(PASSWORD))[:3] == b"235"  # fine before any failure
        for guess in ("a", "b", "c"):
            with Raw(running.smtp_port) as raw:
                raw.send(b"EHLO t\r\n")
                raw.lines()
                assert raw.cmd(plain(guess))[:3] == b"535"
        with Raw(running.smtp_port) as raw:
            raw.send(b"EHLO t\r\n")
            raw.lines()
            # Even the right password: this address has used up its failures for now.
            assert raw.cmd(plain(PASSWORD)).startswith(b"454 4.7.0")
            bogus = b"AUTH PLAIN " + base64.b64encode(b"\0x\0y")
            assert raw.cmd(bogus)[:3] == raw.cmd(bogus)[:3] == b"454"
            assert raw.cmd(bogus).startswith(b"421 4.7.0 AUTH sent too many times")
    finally:
        running.kill()


# -- who the specs let relay -----------------------------------------------------------

def test_the_specs_name_the_relay_networks(tmp_path: Path) -> None:
    """`reconcile serve` lets relay exactly the FedHub's relayNetworks and the maildir
    systems it starts (their submission hosts); a bad network is refused with FILE:LINE."""
    import shutil

    from reconciler.embedded import fed_argv
    from reconciler.errors import SpecError
    from reconciler.spec.loader import load_specs

    specs_dir = tmp_path / "specs"
    shutil.copytree(REPO / "specs", specs_dir)
    fed_yaml = specs_dir / "fed.yaml"
    plain = fed_yaml.read_text()

    def relay_networks() -> list[str]:
        argv = fed_argv(load_specs(specs_dir))
        return [argv[n + 1] for n, arg in enumerate(argv) if arg == "--relay-network"]

    assert relay_networks() == ["127.0.0.1/32"]  # only the maildir systems' host
    fed_yaml.write_text(plain + "  relayNetworks: [10.1.2.0/24, '::1']\n")
    assert relay_networks() == ["10.1.2.0/24", "::1/128", "127.0.0.1/32"]
    fed_yaml.write_text(plain + "  relayNetworks: [10.1.2.300/24]\n")
    with pytest.raises(SpecError) as refused:
        load_specs(specs_dir)
    line = len(plain.splitlines()) + 1
    assert f"fed.yaml:{line}" in str(refused.value) and "not a network" in str(refused.value)
