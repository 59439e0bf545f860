"""fed + the embedded s1/s2 + two private Postfix + Dovecot systems pf1 and pf2.

The world of the real-server tests (`test_postfix_dovecot.py`, `test_busy_target.py`) and of
`bench/cutover_load.py`: `tests/pfdovecot.py` builds each system as an admin would, fed and
the embedded systems run as processes (`reconciler.embedded`), exactly as everywhere else.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pfdovecot import MailHost, make_root, missing_prerequisites
from world import World, base_documents

WHY_NOT = missing_prerequisites()


class PfWorld(World):
    """fed + embedded s1 + private Postfix/Dovecot systems pf1 and pf2."""

    def __init__(self, root: Path, names: tuple[str, ...] = ("pf1", "pf2"), *,
                 hosts: Callable[[int], dict[str, MailHost]] | None = None) -> None:
        """`hosts(fed_port)`: other systems than `names`' (the admins' layouts of
        tests/adminlayouts.py), started the same way."""
        if WHY_NOT:  # in CI a missing server is a failure, not a skip
            raise RuntimeError(f"real Postfix + Dovecot unavailable: {WHY_NOT}")
        self.root = root
        docs = base_documents(root)
        fed_port = int(docs[2]["spec"]["smtp"].rsplit(":", 1)[1])
        self.fed_port = fed_port
        self.hosts = (hosts(fed_port) if hosts is not None else
                      {name: MailHost(name, make_root(f"mailferry-{name}-"), fed_port)
                       for name in names})
        self.base = [docs[0], *(h.spec_document() for h in self.hosts.values()), docs[2], docs[3]]
        self.base_dir = root / "base-specs"
        self.write(self.base_dir, [])
        # The hosts relay to fed's SMTP port: a retry keeps it, and picks the others anew.
        self.embedded = self.start_servers(keep=frozenset({fed_port}))
        try:
            for host in self.hosts.values():
                host.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()
        self.embedded.stop()
        for host in self.hosts.values():
            if not os.environ.get("MAILFERRY_KEEP_TMP"):
                shutil.rmtree(host.root, ignore_errors=True)
