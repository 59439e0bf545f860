"""The data mover as the reconciler's steps use it: one migration's mailbox, from modes.

Why a module between the steps and the pipeline: steps are synchronous, know drivers and
the policy's modes; the pipeline is asyncio and knows endpoints and options. This module
turns the one into the other:

- `endpoint_for(driver, mailbox)`: a driver that can give IMAP access to a mailbox (a
  method ``imap_account(mailbox_id) -> ImapAccount``, which the Postfix + Dovecot and the
  generic IMAP drivers offer) is copied over IMAP, pipelined; any other driver (the
  embedded maildir system) through its own calls;
- `options_from_modes(modes, phase)`: folderMap, verify, throttles of the policy;
- `move_mail(...)`: one mailbox copied and verified, the manifest written into the step's
  transaction, safe to call whether or not an event loop is running in this thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Mapping
from typing import Any

from reconciler.drivers.base import MailSystemDriver
from reconciler.mover.endpoints import DriverEndpoint, Endpoint, ImapAccount, ImapEndpoint
from reconciler.mover.folders import FolderRule
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.progress import Progress
from reconciler.mover.runner import Job, run_jobs_async
from reconciler.mover.throttle import Throttle

_THROTTLES: dict[str, Throttle] = {}  # per source system, shared by every copy of a process


def endpoint_for(driver: MailSystemDriver, mailbox_id: str, *, readonly: bool) -> Endpoint:
    """IMAP when the driver offers it, else the driver's own calls."""
    account = getattr(driver, "imap_account", None)
    if callable(account):
        value = account(mailbox_id)
        if isinstance(value, ImapAccount):
            return ImapEndpoint(value, readonly=readonly)
    return DriverEndpoint(driver, mailbox_id)


def options_from_modes(modes: Mapping[str, Any], phase: str) -> Options:
    """The policy's folderMap and verify mode, as mover options."""
    rules = tuple(FolderRule(str(r["from"]), str(r["to"]))
                  for r in modes.get("folderMap") or [] if "from" in r and "to" in r)
    verify = "deep" if modes.get("verify") == "deep" else "fast"
    return Options(rules=rules, verify=verify, phase=phase)


def throttle_for(system: str, modes: Mapping[str, Any]) -> Throttle:
    """The throttle of a source system (one per system and process, limits from the modes)."""
    limits = modes.get("throttle") or {}
    mps = float(limits.get("messagesPerSecond") or 0)
    bps = float(limits.get("bytesPerSecond") or 0)
    current = _THROTTLES.get(system)
    if current is None or (current.mps, current.bps) != (mps, bps):
        current = _THROTTLES[system] = Throttle(mps, bps)
    return current


def move_mail(src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str, *,
              key: str, modes: Mapping[str, Any], phase: str, manifest: Manifest | None,
              progress: Progress | None = None) -> MailboxReport:
    """Copy and verify one mailbox; the report says what was copied, present, failed."""
    job = Job(key, lambda: endpoint_for(src, src_id, readonly=True),
              lambda: endpoint_for(dst, dst_id, readonly=False),
              throttle=throttle_for(src.name, modes), options=options_from_modes(modes, phase))

    async def go() -> MailboxReport:
        return (await run_jobs_async([job], manifest=manifest, progress=progress,
                                     parallel=1, retries=2))[0]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    # Called from code running inside an event loop: run ours in a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()
