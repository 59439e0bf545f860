"""A hosted mail service on 127.0.0.1 that mailferry cannot administer: the stand-in for
Microsoft 365 or Google Workspace as a migration target.

It is a `MailHost` (`tests/pfdovecot.py`: the one Postfix + Dovecot starter) configured the
way a provider runs it, not the way mailferry's driver would: TLS required on every hop
(Postfix takes mail only after STARTTLS, or on its implicit-TLS port, Dovecot logs no one
in without it), SMTP AUTH
required of every client (Dovecot's SASL; no trusted network, not even loopback), mailboxes
and their addresses provisioned by the provider's admin alone (`provision`, the test playing
that admin: a Dovecot passwd line, a line of Postfix's `virtual_mailbox_maps`). mailferry
gets what a customer of such a service gets: an IMAP login per mailbox (a passwords file),
an SMTP account for fed, the provider's CA. Its MailSystem document is `driver: imap`.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailferry.mail.addresses import address_of_mailbox

from helpers.pki import make_ca, server_cert
from helpers.waiting import wait_for
from pfdovecot import MAIL_USER, MailHost
from sysutil import free_port

PROVIDER_MAIN_CF = """\
# the provider's routing and policy (tests/hosted.py): its own mailboxes, AUTH for everyone
virtual_mailbox_domains = {domains}
virtual_mailbox_maps = hash:{root}/provider/mailboxes
virtual_transport = lmtp:inet:127.0.0.1:{lmtp}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{auth}
smtpd_tls_auth_only = yes
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
"""

PROVIDER_DOVECOT = """\
# SASL for the provider's Postfix (tests/hosted.py)
service auth {{
  inet_listener sasl {{
    address = 127.0.0.1
    port = {auth}
  }}
}}
"""


@dataclass
class HostedHost(MailHost):
    """A provider's Postfix + Dovecot: `provision(address)` is its admin's act, not mailferry's."""

    smtp_user: str = "fedrelay"
    auth_port: int = field(default_factory=free_port)
    smtps_port: int = field(default_factory=free_port)  # implicit TLS (port 465's way)
    passwords: dict[str, str] = field(default_factory=dict)  # address -> IMAP password
    mailboxes: set[str] = field(default_factory=set)  # the addresses provisioned

    @property
    def ca(self) -> Path:
        return self.root / "pki" / "ca.pem"

    @property
    def passwords_file(self) -> Path:  # mailferry's per-user IMAP passwords (the customer's)
        return self.root / "customer" / "imap-passwords"

    @property
    def smtp_password_file(self) -> Path:  # fed's SMTP AUTH password
        return self.root / "customer" / "smtp-password"

    def write_config(self) -> None:
        if self.tls is None:
            ca = make_ca(self.root / "pki")
            cert, key = server_cert(ca, "hosted", "IP:127.0.0.1,DNS:localhost")
            for path in (cert, key, ca):  # Postfix and Dovecot read them as root
                path.chmod(0o644)
            self.tls = (cert, key, ca)
        self.networks = "192.0.2.1/32"  # no trusted network: AUTH or nothing
        super().write_config()
        values = {"root": self.root, "lmtp": self.lmtp_port, "auth": self.auth_port,
                  "domains": ", ".join(self.domains)}
        main_cf = self.postfix_dir / "main.cf"
        kept = [line for line in main_cf.read_text().splitlines(keepends=True)
                if not line.startswith("smtpd_relay_restrictions =")]
        main_cf.write_text("".join(kept) + PROVIDER_MAIN_CF.format(**values))
        with (self.postfix_dir / "master.cf").open("a") as master_cf:
            master_cf.write(f"127.0.0.1:{self.smtps_port} inet n - n - - smtpd "
                            "-o smtpd_tls_wrappermode=yes\n")
        # The provider's logins are the addresses themselves (jane@corp.example), as at
        # Microsoft 365 and Google.
        conf = self.dovecot_conf.read_text().replace("username_format=%n ", "username_format=%u ")
        self.dovecot_conf.write_text(conf + PROVIDER_DOVECOT.format(**values))
        (self.root / "provider").mkdir(exist_ok=True)
        (self.root / "customer").mkdir(exist_ok=True)
        self._write_maps()
        self.smtp_password_file.write_text("relay-secret\n")
        self.smtp_password_file.chmod(0o600)
        self._add_login(self.smtp_user, "relay-secret")

    def _add_login(self, login: str, password: str) -> None:
        user = pwd.getpwnam(MAIL_USER)
        with (self.state_dir / "passwd").open("a") as passwd:
            passwd.write(f"{login}:{{PLAIN}}{password}:{user.pw_uid}:{user.pw_gid}::"
                         f"{self.root}/mail/{login}::\n")

    def _write_maps(self) -> None:
        table = self.root / "provider" / "mailboxes"
        table.write_text("".join(f"{a} OK\n" for a in sorted(self.mailboxes)))
        subprocess.run(["postmap", "-c", str(self.postfix_dir), f"hash:{table}"], check=True,
                       timeout=30)
        self.passwords_file.write_text("".join(f"{a} {p}\n"
                                               for a, p in sorted(self.passwords.items())))

    def expect(self, address: str) -> None:
        """The customer chose the mailbox's password (in mailferry's passwords file) before
        the provider created it."""
        self.passwords[address] = f"pw-{address.partition('@')[0]}"
        self._write_maps()

    def provision(self, address: str) -> None:
        """What the provider's admin does (and mailferry cannot): the mailbox, its login,
        its address; the customer's passwords file has its password."""
        if address not in self.passwords:
            self.expect(address)
        self.mailboxes.add(address)
        self._add_login(address, self.passwords[address])
        self._write_maps()
        if self.postfix is not None:  # at once, as a provider's is: a session that began
            os.kill(self.postfix.pid, signal.SIGHUP)  # before must not keep the old table
        if self.dovecot is not None:  # Dovecot rereads a passwd-file at most once a second
            wait_for(lambda: self._known(address), timeout=10,
                     what=f"{self.name}'s Dovecot to know {address}")

    def _known(self, address: str) -> bool:
        try:
            return address in self.doveadm("user", address)
        except RuntimeError:
            return False

    def user_of(self, mailbox_id: str) -> str:
        return address_of_mailbox(mailbox_id)

    def spec_document(self) -> dict[str, Any]:
        """The customer's view: IMAP with per-user passwords, fed's SMTP account."""
        return {
            "apiVersion": "mailferry/v1", "kind": "MailSystem", "metadata": {"name": self.name},
            "spec": {"driver": "imap", "domains": list(self.domains), "imap": {
                "server": f"127.0.0.1:{self.imap_port}", "tls": "starttls",
                "caFile": str(self.ca), "login": "per-user",
                "passwords": {"file": str(self.passwords_file)},
                "stateDir": str(self.root / "registry"),
                "smtp": f"127.0.0.1:{self.smtp_port}", "smtpTls": "starttls",
                "smtpCaFile": str(self.ca), "smtpRecipient": "{address}",
                "smtpAuth": {"user": self.smtp_user,
                             "password": {"file": str(self.smtp_password_file)}}}}}
