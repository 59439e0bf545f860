"""A namespace host keeps its own /etc while the machine's /etc changes (`tests/netns.py`).

The flake this guards against: `test_remote_hosts.py::test_a_non_root_user_with_sudo_...`
failed in a full CI run with ``mferry@10.77.N.2: Permission denied (publickey)``. The host's
sshd had been started with ``ip netns exec``, which bind-mounts /etc/netns/NS/passwd over
/etc/passwd one file at a time; on a fresh machine `tests/cyrus.py` runs ``useradd cyrus``
in another xdist worker, which renames a new /etc/passwd over the old one, and the kernel
then detaches every mount on the replaced file in every mount namespace: the running sshd
saw the machine's passwd (``Invalid user mferry`` in its log). Now every process of a host
sees /etc through an overlay of the host's own folder (`NetnsHost.wrap`).

Proved here with the kernel's own behaviour, without touching the machine's passwd: a probe
file of the machine's /etc that the host overrides is replaced the way ``useradd`` replaces
/etc/passwd (a new file renamed over it) while a process of the host runs; that process
still reads the host's copy, and the host's sshd still lets the non-root user in, whose
``sudo -n`` still finds its shadow entry and sudoers rule. The same replacement under a
plain ``ip netns exec`` file bind (the old mechanism) is shown to lose the host's copy, so
this test fails if the fixture goes back to it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.processes import stop_process
from netns import SUDO_USER, WHY_NOT, NetnsHost, free_subnet

pytestmark = pytest.mark.timeout(120)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"network namespaces unavailable: {WHY_NOT}", allow_module_level=True)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[NetnsHost]:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, timeout=30)
    h = NetnsHost("etc", 0, free_subnet(), key)
    try:
        h.create()
        yield h
    finally:
        h.stop()


@pytest.fixture
def probe() -> Iterator[Path]:
    """A file of the machine's /etc that only this test uses."""
    path = Path(f"/etc/mailferry-probe-{os.getpid()}")
    path.write_text("the machine's, before\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def replace_like_useradd(path: Path, text: str) -> None:
    """What useradd does to /etc/passwd: write a new file next to it, rename it over."""
    new = path.with_name(path.name + "+")
    new.write_text(text)
    os.rename(new, path)


def seen_by(proc: subprocess.Popen[bytes], path: Path) -> str:
    """`path` as the process `proc` sees it (its mount namespace)."""
    deadline = time.monotonic() + 30
    while True:  # the wrapper has mounted and exec'd sleep: its command line says so
        if (Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
                or time.monotonic() > deadline):
            break
        time.sleep(0.05)
    return Path(f"/proc/{proc.pid}/root{path}").read_text()


def as_user(host: NetnsHost, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-i", str(host.client_key), "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
                           f"{SUDO_USER}@{host.address}", command],
                          capture_output=True, text=True, timeout=60)


def test_the_hosts_etc_survives_the_machine_replacing_a_file(host: NetnsHost,
                                                             probe: Path) -> None:
    (host.etc / probe.name).write_text("the host's own\n")
    host.grant(f"{SUDO_USER} ALL=(root) NOPASSWD: /usr/bin/id -u\n")
    host.start_sshd()
    sleeper = subprocess.Popen([*host.wrap(), "sleep", "60"], start_new_session=True)
    try:
        assert seen_by(sleeper, probe) == "the host's own\n"
        before = as_user(host, "id -un && sudo -n /usr/bin/id -u")
        assert (before.returncode, before.stdout.split()) == (0, [SUDO_USER, "0"]), before
        replace_like_useradd(probe, "the machine's, after\n")
        assert probe.read_text() == "the machine's, after\n"  # the machine sees its new file
        assert seen_by(sleeper, probe) == "the host's own\n"  # the host still its own
    finally:
        stop_process(sleeper)
    # The sshd started before the replacement still knows the user, sudo its shadow entry.
    after = as_user(host, "id -un && sudo -n /usr/bin/id -u")
    assert (after.returncode, after.stdout.split()) == (0, [SUDO_USER, "0"]), after
    log = (host.root / "ssh" / "sshd.log").read_text(errors="replace")
    assert "Invalid user" not in log and log.count(f"Accepted publickey for {SUDO_USER}") == 2


def test_a_per_file_bind_of_ip_netns_exec_is_lost_when_the_file_is_replaced(
        host: NetnsHost, probe: Path) -> None:
    """The mechanism the fixture no longer uses, shown failing: why the overlay."""
    etc = Path("/etc/netns") / host.ns
    etc.mkdir(parents=True)
    try:
        (etc / probe.name).write_text("the host's own\n")
        sleeper = subprocess.Popen(["ip", "netns", "exec", host.ns, "sleep", "60"],
                                   start_new_session=True)
        try:
            assert seen_by(sleeper, probe) == "the host's own\n"
            replace_like_useradd(probe, "the machine's, after\n")
            assert seen_by(sleeper, probe) == "the machine's, after\n"
        finally:
            stop_process(sleeper)
    finally:
        (etc / probe.name).unlink(missing_ok=True)
        etc.rmdir()


def test_a_process_left_in_the_namespace_fails_the_stop_and_is_killed(host: NetnsHost) -> None:
    """What leaked a Dovecot and a Postfix master from every full run: a world that started
    a mail host's servers without handing them to the host, so nothing stopped them before
    the namespace was deleted (they ran on, unreachable). Now the stop names and kills what
    is left, and the world that forgot it fails."""
    host.start_sshd()
    forgotten = subprocess.Popen([*host.wrap(), "sleep", "300"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30  # until the wrapper has exec'd sleep
        while (Path(f"/proc/{forgotten.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep"
               and time.monotonic() < deadline):
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=rf"{forgotten.pid} sleep 300") as stopped:
            host.stop()
        assert forgotten.wait(timeout=10) == -9, "killed by its PID"
        assert "sshd" not in str(stopped.value), "sshd is the host's own: stopped, not left"
        listed = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True,
                                text=True, timeout=30)
        assert listed.returncode != 0, "the namespace is deleted all the same"
        host.stop()  # a second stop (the fixture's) finds nothing and raises nothing
    finally:
        stop_process(forgotten)
