"""A running embedded world for end-to-end tests: fed + s1 + s2 as real processes.

`World` writes a spec set with free ports in a temporary folder, starts the embedded default
from it (`reconciler.embedded`, the same code `reconcile serve` and the demo use) and lets a
test rewrite the placements and policies between reconciler runs. Every test uses its own
addresses, so one world serves a whole module.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from reconciler.cli import build_engine
from reconciler.drivers.base import mailbox_id_for
from reconciler.embedded import Embedded, start_embedded
from reconciler.engine import Engine
from reconciler.errors import MailferryError
from reconciler.spec.loader import load_specs

from sysutil import free_port

REPO = Path(__file__).resolve().parents[1]
START_ATTEMPTS = 3  # a port taken between free_port and the server's bind: new ports, again


def base_documents(root: Path) -> list[dict[str, Any]]:
    """Systems, fed and an always-open window, with free ports and paths under `root`."""
    def system(name: str) -> dict[str, Any]:
        return {"apiVersion": "mailferry/v1", "kind": "MailSystem", "metadata": {"name": name},
                "spec": {"driver": "maildir", "domains": ["corp.example"],
                         "maildir": {"root": str(root / "var" / name),
                                     "lmtp": f"127.0.0.1:{free_port()}",
                                     "submission": f"127.0.0.1:{free_port()}"}}}
    return [
        system("s1"), system("s2"),
        {"apiVersion": "mailferry/v1", "kind": "FedHub", "metadata": {"name": "fed"},
         "spec": {"smtp": f"127.0.0.1:{free_port()}",
                  "control": f"http://127.0.0.1:{free_port()}",
                  "token": {"file": str(root / "var" / "fed.token")},
                  "stateDir": str(root / "var" / "fed"), "domains": ["corp.example"]}},
        {"apiVersion": "mailferry/v1", "kind": "MigrationWindow", "metadata": {"name": "always"},
         "spec": {"timeZone": "UTC", "windows": [
             {"kind": "allow", "start": "2020-01-01T00:00:00Z", "end": "2040-01-01T00:00:00Z"}]}},
    ]


def policy(name: str, **spec: Any) -> dict[str, Any]:
    full = {"stationChecks": False, "dataTransfer": "copy", "diary": True,
            "localStationData": False, "deleteSource": {"after": "0s", "consent": True},
            "prestageLead": "0s", "recheckLead": "0s", "maxParallel": 10}
    full.update(spec)
    return {"apiVersion": "mailferry/v1", "kind": "MigrationPolicy", "metadata": {"name": name},
            "spec": full}


def placement(name: str, system: str, mailboxes: list[dict[str, Any]], *,
              policy_name: str | None = None, window: str | None = "always") -> dict[str, Any]:
    spec: dict[str, Any] = {"system": system, "mailboxes": mailboxes}
    if window:
        spec["window"] = window
    if policy_name:
        spec["policy"] = policy_name
    return {"apiVersion": "mailferry/v1", "kind": "MailboxPlacement",
            "metadata": {"name": name}, "spec": spec}


def port_was_taken(error: MailferryError) -> bool:
    """Whether a server that exited before it was ready says, in the log the error names,
    that its address was already in use (and not any other reason to exit)."""
    text = str(error)
    if "before it was ready" not in text or "; see " not in text:
        return False
    log = Path(text.rsplit("; see ", 1)[1])
    try:
        return "address already in use" in log.read_text(errors="replace").lower()
    except OSError:
        return False


def with_fresh_ports(docs: list[dict[str, Any]], keep: frozenset[int] = frozenset(),
                     ) -> list[dict[str, Any]]:
    """`docs` with a new free port for every embedded server's listener (fed's SMTP and
    control, each maildir system's LMTP and submission), but the ports in `keep`."""
    def fresh(address: str) -> str:
        head, port = address.rsplit(":", 1)
        return address if int(port) in keep else f"{head}:{free_port()}"

    out = copy.deepcopy(docs)
    for doc in out:
        spec = doc["spec"]
        if doc["kind"] == "FedHub":
            spec["smtp"], spec["control"] = fresh(spec["smtp"]), fresh(spec["control"])
        elif doc["kind"] == "MailSystem" and spec.get("driver") == "maildir":
            for key in ("lmtp", "submission"):
                spec["maildir"][key] = fresh(spec["maildir"][key])
    return out


class World:
    """fed, s1 and s2 running; specs written per test into their own folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = base_documents(root)
        self.base_dir = root / "base-specs"
        self.write(self.base_dir, [])
        self.embedded: Embedded = self.start_servers()

    def start_servers(self, keep: frozenset[int] = frozenset()) -> Embedded:
        """The embedded default of the base specs, started; logs in root/logs.

        A server that exits before it is ready because its port was taken since free_port
        chose it (another run on the machine bound it meanwhile): every embedded port but
        `keep` is chosen again, the base specs rewritten and all started again, at most
        START_ATTEMPTS times (the logs of attempt N in root/logs-N). Any other early exit
        fails at once, naming its log."""
        for attempt in range(1, START_ATTEMPTS + 1):
            logs = self.root / ("logs" if attempt == 1 else f"logs-{attempt}")
            try:
                return start_embedded(load_specs(self.base_dir), log_dir=logs)
            except MailferryError as error:
                if attempt == START_ATTEMPTS or not port_was_taken(error):
                    raise
            self.base = with_fresh_ports(self.base, keep)
            self.write(self.base_dir, [])
        raise AssertionError("unreachable")

    def write(self, directory: Path, extra: list[dict[str, Any]]) -> Path:
        """A complete spec set: the world's base documents plus `extra`."""
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.yaml"):
            old.unlink()
        (directory / "base.yaml").write_text(yaml.safe_dump_all(self.base, sort_keys=False))
        if extra:
            (directory / "wanted.yaml").write_text(yaml.safe_dump_all(extra, sort_keys=False))
        return directory

    def engine(self, directory: Path, state: str) -> Engine:
        return build_engine(load_specs(directory), state)

    def stop(self) -> None:
        self.embedded.stop()


def mailbox_message_ids(engine: Engine, system: str, address: str) -> Counter[str]:
    """Message-ID -> copies over every folder of `address`'s mailbox on `system`."""
    driver = engine.drivers[system]
    mailbox = mailbox_id_for(address)
    found: Counter[str] = Counter()
    if driver.get_account(mailbox) is None:
        return found
    for folder in driver.list_folders(mailbox):
        for msg in driver.list_messages(mailbox, folder):
            found[msg.message_id or msg.sha256] += 1
    return found


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`reconcile ARGS` as a real subprocess."""
    import os

    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
