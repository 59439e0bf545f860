"""`reconcile adopt | import | release SYSTEM`: take over an admin's system, and give it back.

The driver does the system's side (`drivers.pfdovecot_adopt`); this module is the part
between the specs, fed and the driver: which system (refused with the spec's FILE:LINE when
it cannot be adopted), fed told about the adopted mailboxes (so that ``--plan`` sees them
where they are), and the ``MailboxPlacement`` file an import writes, validated with the
whole spec set before it is kept.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from reconciler.drivers.base import Account, MailSystemDriver
from reconciler.drivers.pfdovecot_adopt import AdoptedPostfixDovecotDriver, AdoptionCheck
from reconciler.engine import Engine
from reconciler.errors import PermanentError, SpecError
from reconciler.spec.model import SpecSet


def adopted_driver(specs: SpecSet, drivers: dict[str, MailSystemDriver],
                   system: str) -> AdoptedPostfixDovecotDriver:
    """The adopted driver of `system`, or a PermanentError saying why it is none."""
    spec = specs.systems.get(system)
    if spec is None:
        known = ", ".join(sorted(specs.systems)) or "none"
        raise PermanentError(f"no MailSystem named {system!r} in {specs.root} (known: {known})")
    driver = drivers.get(system)
    if not isinstance(driver, AdoptedPostfixDovecotDriver):
        raise PermanentError(f"{spec.location}: system {system} is not adoptable: set "
                             "driver: postfix-dovecot and postfixDovecot.adopt: true")
    return driver


def check(specs: SpecSet, drivers: dict[str, MailSystemDriver], system: str
          ) -> AdoptionCheck:
    """The dry run: what adoption would add, what blocks it (nothing is changed)."""
    return adopted_driver(specs, drivers, system).check()


def publish(engine: Engine, system: str) -> list[Account]:
    """Tell fed where the system's mailboxes are (register + up-sync), and every system
    where everyone is (down-sync); the accounts.

    The down-sync at once, not at the next pass's end: an adopted system's domain is in
    `virtual_mailbox_domains`, so until its overlay knows the colleagues on the other
    systems (the address book), its Postfix refuses mail to them with 550."""
    driver = adopted_driver(engine.specs, engine.drivers, system)
    engine.register_systems()
    engine.fed.refresh_system(system)
    accounts = driver.list_accounts()
    engine.fed.upsync(system, {a.physical_address: list(a.all_addresses) for a in accounts})
    engine.downsync()
    return accounts


def adopt(engine: Engine, system: str) -> tuple[AdoptionCheck, int]:
    """Check, record, install the overlay, then publish the mailboxes to fed."""
    driver = adopted_driver(engine.specs, engine.drivers, system)
    found = driver.adopt()
    return found, len(publish(engine, system))


def import_specs(engine: Engine, system: str, out: Path | None, *, force: bool = False
                 ) -> tuple[Path, int]:
    """Write one MailboxPlacement of what `system` holds; validated with the spec set."""
    driver = adopted_driver(engine.specs, engine.drivers, system)
    if driver.record() is None:
        raise PermanentError(f"{system} is not adopted yet: run reconcile adopt --check "
                             f"{system}, then reconcile adopt {system}")
    root = Path(engine.specs.root)
    path = out if out is not None else root / f"imported-{system}.yaml"
    if path.exists() and not force:
        raise PermanentError(f"{path} exists: choose another --out, or --force to replace it")
    if path.resolve().parent != root.resolve():
        raise PermanentError(f"{path} is not in the specs folder {root}: the import must be "
                             "part of the spec set it is checked against")
    accounts = publish(engine, system)
    name = f"{system}-imported"
    desired = {a: d for a, d in engine.specs.desired().items() if d.placement != name}
    mailboxes = []
    for account in accounts:
        address = account.access_addresses[0] if account.access_addresses else None
        if address is None or (address in desired and desired[address].system != system):
            continue  # another placement places it elsewhere: a migration, not an import
        if address in desired:
            continue  # already in a spec for this system
        entry: dict[str, Any] = {"address": address}
        if account.aliases:
            entry["aliases"] = list(account.aliases)
        mailboxes.append(entry)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {"apiVersion": "mailferry/v1", "kind": "MailboxPlacement",
           "metadata": {"name": name,
                        "description": f"reconcile import {system} at {stamp}"},
           "spec": {"system": system, "mailboxes": mailboxes}}
    text = (f"# what {system} held at {stamp} (reconcile import {system}): edit freely\n"
            + yaml.safe_dump(doc, sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        from reconciler.spec.loader import load_specs

        os.replace(tmp, path)
        load_specs(str(root))  # the import is part of the spec set: it must load with it
    except SpecError:
        path.unlink()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path, len(mailboxes)


def release(engine: Engine, system: str, *, force: bool = False) -> list[str]:
    """Remove the overlay; the postconf -n and map diff against the adoption record."""
    return adopted_driver(engine.specs, engine.drivers, system).release(force=force)
