"""The server family table (`mailferry/mail/imap/servers.py`) checked against the real
servers the suite runs: a private Dovecot and a private Cyrus on 127.0.0.1. A row that no
longer matches its server fails here."""

from __future__ import annotations

import base64
import shutil
import socket
from collections.abc import Iterator

import pytest

from mailferry.mail.imap.client import parse_response
from mailferry.mail.imap.servers import CYRUS, DOVECOT, ServerFamily, family_of

import cyrus
import dovecot

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[int, tuple[str, str], str]]]:
    """family name -> (port, admin login, user)"""
    dovecot.skip_unless_available()
    cyrus.skip_unless_available()
    roots = [dovecot.private_root(), cyrus.private_root()]
    dv = dovecot.Dovecot(roots[0], "tdv", {"ann": "pw-ann", "bob": "pw-bob"},
                         master=("admin", "admin-pw"))
    cy = cyrus.Cyrus(roots[1], "tcy", {"ann": "pw-ann", "bob": "pw-bob"})
    try:
        dv.start()
        cy.start()
        # bob shares a folder with ann (the other users' namespace, where it exists)
        conn = cy.login("bob")
        conn.create("INBOX.Shared")
        conn.setacl("INBOX.Shared", "ann", "lr")
        conn.logout()
        yield {"dovecot": (dv.port, ("admin", "admin-pw"), "ann"),
               "cyrus": (cy.port, cy.admin, "ann")}
    finally:
        cy.stop()
        dv.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def talk(port: int, *writes: list[bytes]) -> tuple[bytes, bytes]:
    """Greeting, and what the server answered: each write's lines sent at once, the next
    write only after every tag of this one was answered or the server was quiet for 2 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        greeting = s.recv(65536)
        answer = b""
        for lines in writes:
            s.sendall(b"".join(lines))
            tags = {line.split(b" ", 1)[0] for line in lines}
            try:
                while not tags <= {line.split(b" ", 1)[0] for line in answer.split(b"\r\n")}:
                    data = s.recv(65536)
                    if not data:
                        break
                    answer += data
            except TimeoutError:
                pass
        return greeting, answer


@pytest.mark.parametrize("family", [DOVECOT, CYRUS], ids=lambda f: f.name)
def test_each_row_matches_its_server(
        family: ServerFamily, servers: dict[str, tuple[int, tuple[str, str], str]]) -> None:
    port, (admin, password), user = servers[family.name]
    token = base64.b64encode(f"{user}\0{admin}\0{password}".encode())
    greeting, answer = talk(port, [
        b"A1 AUTHENTICATE PLAIN " + token + b"\r\n", b"A2 NAMESPACE\r\n",
        b'A3 LIST "" "*"\r\n'])
    assert family_of(greeting) is family
    assert (b"[CAPABILITY " in greeting) is family.capabilities_in_greeting
    lines = answer.split(b"\r\n")
    login_ok = next(line for line in lines if line.startswith(b"A1 OK"))
    assert (b"[CAPABILITY " in login_ok) is family.capabilities_in_login_ok
    offered = {c.decode().upper() for c in login_ok.split(b"[CAPABILITY ", 1)[1]
               .split(b"]", 1)[0].split()}
    assert family.capabilities <= offered
    before = {c.decode().upper() for c in greeting.split(b"[CAPABILITY ", 1)[1]
              .split(b"]", 1)[0].split()}
    assert family.login_capabilities <= before
    # a command pipelined behind AUTHENTICATE
    if family.behind_authenticate == "runs it once logged in":
        assert any(line.startswith(b"A2 OK") for line in lines)
        assert any(line.startswith(b"A3 OK") for line in lines)
    else:
        # not taken: commands behind the login lost (sometimes a BAD under the login's
        # tag first, as in issue 21)
        assert not any(line.startswith(b"A3 ") for line in lines)
    # namespace and separator, asked one command at a time
    _, answer = talk(port, [b"A1 AUTHENTICATE PLAIN " + token + b"\r\n"],
                     [b"A2 NAMESPACE\r\n"])
    ns_line = next(line for line in answer.split(b"\r\n") if line.startswith(b"* NAMESPACE"))
    parsed = parse_response([ns_line[2:]])
    personal, other = parsed[1], parsed[2]
    assert isinstance(personal, list) and isinstance(personal[0], list)
    assert personal[0][0] == family.personal_prefix.encode() or (
        family is DOVECOT and personal[0][0] == b"")
    assert personal[0][1] == family.separator.encode()
    if family.other_users_prefix is None:
        assert other is None
    else:
        assert isinstance(other, list) and isinstance(other[0], list)
        assert other[0][0] == family.other_users_prefix.encode()
