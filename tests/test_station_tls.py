"""The station agent's E31 submission test over real TLS, with real certificates.

A private CA and server certificates are made with `openssl` for the test; aiosmtpd servers
on loopback speak STARTTLS (with AUTH allowed only after it) and implicit TLS. The agent must
trust the new server only through the CA it was given (`ca_file`), check the host name, log
in only over TLS, and name the stage and the reason when it refuses.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from station_agent.checks import smtp_reachable, try_submission
from station_agent.thunderbird.switch import Endpoint

from sysutil import free_port

ADDRESS = "tls.user@corp.example"


@dataclass(frozen=True)
class Pki:
    ca: Path
    good: tuple[Path, Path]  # cert, key for 127.0.0.1 / localhost
    wrong_name: tuple[Path, Path]  # cert, key for another host name only


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                   timeout=60)


def _server_cert(tmp: Path, name: str, san: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem",
                           tmp / f"{name}.ext")
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}", cwd=tmp)
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", cert, "-extfile", ext, cwd=tmp)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=mailferry test CA", cwd=tmp)
    return Pki(tmp / "ca.pem", _server_cert(tmp, "good", "IP:127.0.0.1,DNS:localhost"),
               _server_cert(tmp, "other", "DNS:mail.other.example"))


class Recorder:
    """aiosmtpd handler: accepts everything and remembers who logged in how."""

    def __init__(self) -> None:
        self.logins: list[tuple[str, bool]] = []  # (user, over TLS)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def authenticator(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = auth_data.login == b"tls.user" and auth_data.password == b"secret"
        if ok:
            tls = server.transport.get_extra_info("ssl_object") is not None
            self.logins.append((auth_data.login.decode(), tls))
        return AuthResult(success=ok)


def _context(cert_key: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, cert_key))
    return context


@contextlib.contextmanager
def starttls_on(cert_key: tuple[Path, Path]) -> Iterator[tuple[Controller, Recorder]]:
    """A submission server that requires STARTTLS and offers AUTH only after it."""
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            tls_context=_context(cert_key), require_starttls=True,
                            auth_require_tls=True, authenticator=handler.authenticator)
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()


@pytest.fixture
def starttls_server(pki: Pki) -> Iterator[tuple[Controller, Recorder]]:
    with starttls_on(pki.good) as server:
        yield server


def test_starttls_with_the_private_ca_logs_in_over_tls(
        pki: Pki, starttls_server: tuple[Controller, Recorder]) -> None:
    controller, handler = starttls_server
    endpoint = Endpoint("127.0.0.1", controller.port, "starttls")
    result = try_submission(endpoint, ADDRESS, user="tls.user", password="secret",
                            ca_file=str(pki.ca))
    assert result.ok, result
    assert result.stage == "RCPT TO" and result.code == 250
    assert handler.logins == [("tls.user", True)]
    assert smtp_reachable(endpoint, ca_file=str(pki.ca)) is None


def test_an_untrusted_certificate_is_refused_before_any_login(
        starttls_server: tuple[Controller, Recorder]) -> None:
    controller, handler = starttls_server
    result = try_submission(Endpoint("127.0.0.1", controller.port, "starttls"), ADDRESS,
                            user="tls.user", password="secret")  # system CAs only
    assert not result.ok
    assert result.stage == "connect" and "CERTIFICATE_VERIFY_FAILED" in result.reply
    assert handler.logins == []


def test_a_certificate_for_another_host_name_is_refused(pki: Pki) -> None:
    with starttls_on(pki.wrong_name) as (controller, handler):
        endpoint = Endpoint("127.0.0.1", controller.port, "starttls")
        reason = smtp_reachable(endpoint, ca_file=str(pki.ca))
        assert reason is not None and "127.0.0.1" in reason and "mismatch" in reason.lower()
        result = try_submission(endpoint, ADDRESS, user="tls.user", password="secret",
                                ca_file=str(pki.ca))
        assert not result.ok and result.stage == "connect"
        assert handler.logins == []


def test_plain_connection_to_a_starttls_only_server_is_refused_at_mail_from(
        starttls_server: tuple[Controller, Recorder]) -> None:
    """A profile switched to `none` against a server that requires STARTTLS must fail the
    E31 test with the server's answer, not pass silently."""
    controller, handler = starttls_server
    result = try_submission(Endpoint("127.0.0.1", controller.port, "none"), ADDRESS,
                            user="tls.user", password="secret")
    assert not result.ok
    assert result.stage == "MAIL FROM" and result.code == 530
    assert handler.logins == []


def test_implicit_tls(pki: Pki) -> None:
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            ssl_context=_context(pki.good),
                            # aiosmtpd counts only STARTTLS as TLS for this switch; the
                            # handler checks the transport itself.
                            auth_require_tls=False, authenticator=handler.authenticator)
    controller.start()
    try:
        endpoint = Endpoint("127.0.0.1", controller.port, "tls")
        result = try_submission(endpoint, ADDRESS, user="tls.user", password="secret",
                                ca_file=str(pki.ca))
        assert result.ok, result
        assert handler.logins == [("tls.user", True)]
    finally:
        controller.stop()
