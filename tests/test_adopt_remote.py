"""Adoption of an admin's system on another host, over SSH (the host seam, `tests/netns.py`).

The admin's layout a (`tests/adminlayouts.py`: passwd-file users as full addresses, `hash:`
maps) runs in its own network namespace with its own sshd; the reconciler and fed are in
the root namespace, its account database and adoption record on its side (`stateDir`), the
overlay tables on the host (`tablesDir`). Proved: `adopt --check`, `adopt`, `import` and
`--plan` work with every command and table write going over SSH (`SshHost`), mail fed
routes to an adopted mailbox reaches it through the overlay on the remote Postfix, and
`release` leaves every file the admin wrote on the host byte-identical to before adoption.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.pfdovecot_adopt import AdoptedPostfixDovecotDriver
from reconciler.drivers.sshhost import SshHost, close_shared_hosts

from adminlayouts import AdminHost
from helpers import mail
from helpers.waiting import wait_for
from netns import NetnsHost, free_subnet
from netns import missing_prerequisites as netns_missing
from pfdovecot import missing_prerequisites as mail_missing
from sysutil import free_port
from world import World, base_documents, run_cli

pytestmark = pytest.mark.timeout(300)

WHY_NOT = netns_missing() or mail_missing()
if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"a host in a network namespace unavailable: {WHY_NOT}",
                allow_module_level=True)

USERS = tuple(f"r{n:02d}@corp.example" for n in range(1, 6))


class RemoteAdminWorld(World):
    """fed + embedded s1 here, the admin's system `ra` in a namespace behind its sshd."""

    def __init__(self, root: Path) -> None:
        if WHY_NOT:
            raise RuntimeError(f"a host in a network namespace unavailable: {WHY_NOT}")
        self.root = root
        keys = root / "reconciler-ssh"
        keys.mkdir(mode=0o700)
        self.key = keys / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key),
                        "-C", "mailferry reconciler"], check=True, timeout=30)
        self.fed_port = free_port()
        subnet = free_subnet()
        self.ns = NetnsHost("ra", self.fed_port, subnet, self.key)
        self.host: AdminHost | None = None
        try:
            self.ns.create()
            self.ns.start_sshd()
            self.known_hosts = keys / "known_hosts"
            self.known_hosts.write_text(self.ns.known_hosts_line())
            self.host = AdminHost("ra", self.ns.root / "mailhost", self.fed_port,
                                  layout="passwd", users=USERS,
                                  aliases={f"info.{u}": u for u in USERS},
                                  address=self.ns.address, wrap=tuple(self.ns.wrap()),
                                  networks=f"127.0.0.0/8 10.77.{subnet}.0/24")
            self.ns.mail = self.host  # so that the namespace's stop stops its servers first
            self.host.root.mkdir(mode=0o755)
            self.host.start()
            docs = base_documents(root)
            docs[2]["spec"]["smtp"] = f"{self.ns.outside}:{self.fed_port}"
            self.base = [docs[0], self.system_document(), docs[2], docs[3]]
            self.base_dir = root / "base-specs"
            self.write(self.base_dir, [])
            self.embedded = self.start_servers(keep=frozenset({self.fed_port}))
        except BaseException:
            self.stop()
            raise

    @property
    def admin(self) -> AdminHost:
        assert self.host is not None
        return self.host

    def system_document(self) -> dict[str, Any]:
        host = self.admin
        doc = host.spec_document()
        box = doc["spec"]["postfixDovecot"]
        secret = self.root / "secrets" / "ra.master"  # a copy: nothing read off the host
        secret.parent.mkdir(exist_ok=True)
        shutil.copy(host.password_file, secret)
        box.update({"host": f"ssh://root@{self.ns.address}:22",
                    "stateDir": str(self.root / "reconciler-state" / "ra"),
                    "tablesDir": str(host.state_dir), "sshIdentityFile": str(self.key),
                    "sshKnownHostsFile": str(self.known_hosts),
                    "masterUser": {"user": box["masterUser"]["user"],
                                   "password": {"file": str(secret)}}})
        return doc

    def stop(self) -> None:
        close_shared_hosts()  # our SSH masters first: no sshd session outlives its host
        try:
            self.ns.stop()  # the mail servers, sshd, the namespace
        finally:
            if hasattr(self, "embedded"):
                self.embedded.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteAdminWorld]:
    made = RemoteAdminWorld(tmp_path_factory.mktemp("adoptremote"))
    yield made
    made.stop()


def test_adopt_import_release_over_ssh(world: RemoteAdminWorld, tmp_path: Path) -> None:
    host = world.admin
    before = host.admin_files()
    specs = world.write(tmp_path / "specs", [])
    state = tmp_path / "state.db"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = run_cli("--specs", str(specs), "--state", str(state), *args, cwd=world.root,
                       timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    assert "ra: 5 mailboxes found" in cli("adopt", "--check", "ra").stdout
    assert host.admin_files() == before
    cli("adopt", "ra")
    cli("import", "ra")
    plan = cli("--plan").stdout
    assert "No changes" in plan and "5 mailboxes" in plan
    # the overlay is on the host, the database and the record with the reconciler
    assert (host.state_dir / "virtual_alias.db").exists()
    local = sorted(p.name for p in (world.root / "reconciler-state" / "ra").iterdir())
    assert "adoption.json" in local and "mailferry.db" in local and "transport" not in local
    engine = world.engine(specs, f"sqlite:///{state}")
    driver = engine.drivers["ra"]
    assert isinstance(driver, AdoptedPostfixDovecotDriver) and isinstance(driver.host, SshHost)
    assert driver.get_account("r01=corp.example") is not None
    # fed routes r01's mail to ra's physical address; the remote overlay hands it to Dovecot
    import smtplib

    with smtplib.SMTP(world.ns.outside, world.fed_port, timeout=10) as smtp:
        smtp.sendmail("x@outside.example", ["info.r01@corp.example"],
                      mail.message("hi", "<remote1@outside.example>",
                                   to="info.r01@corp.example"))
    wait_for(lambda: host.message_ids("r01@corp.example")["<remote1@outside.example>"] == 1,
             what="fed -> ra (over the overlay) -> r01's Maildir", timeout=30)
    released = cli("release", "ra").stdout
    assert "byte-identical to adoption" in released
    assert host.admin_files() == before
    assert not (host.state_dir / "virtual_alias.db").exists()
