"""The test mail host knows its own listeners: a port another process took between
`free_port` and the server's bind (parallel tests draw from one range) is found and the
host starts again on new ports, instead of a whole module failing later on "connection
refused" (seen once in CI: pf2's Postfix had exited on "address in use" while another
worker's listener answered the start-up wait)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from mailferry.ports import free_port

from pfdovecot import MailHost, listens_in, make_root, missing_prerequisites


def test_a_listener_is_found_in_its_process_and_its_children_only() -> None:
    with socket.create_server(("127.0.0.1", 0)) as mine:
        port = mine.getsockname()[1]
        assert listens_in(os.getpid(), port)
    child = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\n"
         "s = socket.create_server(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True)\n"
         "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        theirs = int(child.stdout.readline())
        assert listens_in(os.getpid(), theirs)  # a child of this process
        assert not listens_in(child.pid, free_port())  # nobody listens there
        with socket.create_server(("127.0.0.1", 0)) as other:
            assert not listens_in(child.pid, other.getsockname()[1])  # its parent's
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.mark.parametrize("listening", [True, False])
def test_a_host_whose_port_was_taken_starts_on_new_ports(listening: bool) -> None:
    """Postfix's port held by a listener (it answers the wait: found by `listens_in`), or
    Dovecot's by a bound socket that does not listen (Dovecot exits on "Address already
    in use"): either way the host comes up on new ports."""
    why = missing_prerequisites()
    if why:
        pytest.skip(why)
    host = MailHost("pft", make_root("mailferry-pft-"), fed_port=1)
    port = "smtp_port" if listening else "lmtp_port"
    taken = getattr(host, port)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", taken))
    if listening:
        squatter.listen()
    try:
        host.start()
        assert getattr(host, port) != taken
        assert host.postfix is not None and listens_in(host.postfix.pid, host.smtp_port)
        assert host.dovecot is not None and listens_in(host.dovecot.pid, host.imap_port)
    finally:
        squatter.close()
        host.stop()
        shutil.rmtree(host.root, ignore_errors=True)
