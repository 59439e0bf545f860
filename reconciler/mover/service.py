"""The data mover as the reconciler's steps use it: one migration's mailbox, from modes.

Why a module between the steps and the pipeline: steps are synchronous, know drivers and
the policy's modes; the pipeline is asyncio and knows endpoints and options. This module
turns the one into the other:

- `endpoint_for(driver, mailbox)`: a driver that can give IMAP access to a mailbox (a
  method ``imap_account(mailbox_id) -> ImapAccount``, which the Postfix + Dovecot and the
  generic IMAP drivers offer) is copied over IMAP, pipelined; any other driver (the
  embedded maildir system) through its own calls;
- `options_from_modes(modes, phase)`: folderMap, verify, throttles of the policy;
- `pace_for(system, modes)`: the system's connection limits, daily budget and back-off
  (`pace.py`), one per system and process;
- `move_mail(...)`: one mailbox copied and verified, the manifest written into the step's
  transaction, safe to call whether or not an event loop is running in this thread.

Why one event loop thread per process (`mover_loop()`): the steps copy a mailbox twice in a
row (E11-E14, then the delta E15 after the flip), and `reconcile --watch` copies again at
every pass that finds something due. Logged-in IMAP connections belong to the loop that
opened them, so copies that each ran in their own `asyncio.run` logged in again every time
(on Dovecot a login starts two processes: most of what a copy that finds nothing to do
costs). The steps' copies therefore all run on one long-lived loop with one connection pool;
an idle connection is kept at most `IDLE_SECONDS` (well under servers' autologout) and every
one is logged out at exit. The calling thread waits for the result, so the step's database
session is still used by one thread at a time.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from reconciler.drivers.base import ImapAccount, MailSystemDriver
from reconciler.mover.dovecot_direct import DovecotDirectEndpoint, DovecotLayout
from reconciler.mover.endpoints import DriverEndpoint, Endpoint, ImapEndpoint
from reconciler.mover.folders import FolderRule
from reconciler.mover.manifest import Manifest
from reconciler.mover.pace import Limits, LocalPace, SystemPace
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.pool import ConnectionPool
from reconciler.mover.progress import Progress
from reconciler.mover.runner import Job, run_jobs_async
from reconciler.mover.throttle import Throttle
from reconciler.spec.modes import Modes

_THROTTLES: dict[str, Throttle] = {}  # per source system, shared by every copy of a process
_PACES: dict[str, LocalPace] = {}  # per system (source or target), likewise
IDLE_SECONDS = 120.0  # how long a pooled connection may wait for the next copy
T = TypeVar("T")


class MoverLoop:
    """A daemon thread running one event loop, and the connection pool that lives on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = ConnectionPool(max_idle=64, max_age=IDLE_SECONDS)
        self.thread = threading.Thread(target=self.loop.run_forever, name="mover-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result in the calling thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self, timeout: float = 5.0) -> None:
        """Log the idle connections out and stop the loop."""
        if not self.loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self.pool.close(), self.loop)
        # On a timeout the servers end the sessions themselves (autologout).
        with contextlib.suppress(concurrent.futures.TimeoutError, OSError):
            future.result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


_LOOP: MoverLoop | None = None
_LOOP_LOCK = threading.Lock()


def mover_loop() -> MoverLoop:
    """The process's mover loop, started on first use and closed at exit."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = MoverLoop()
            atexit.register(_LOOP.close)
        return _LOOP


def forget_logins(driver: MailSystemDriver, mailbox_id: str) -> None:
    """Drop pooled sessions of a mailbox that is being deleted or created (see `forget`).

    Best effort and never raising: a mailbox the driver no longer knows has no login to drop,
    and the pool's `max_age` bounds any session this misses."""
    account = getattr(driver, "imap_account", None)
    if _LOOP is None or not callable(account):
        return
    try:
        value = account(mailbox_id)
    except Exception:  # see the docstring
        return
    if isinstance(value, ImapAccount):
        pool = _LOOP.pool
        _LOOP.run(_call(lambda: pool.forget(value)))


async def _call(fn: Callable[[], T]) -> T:
    return fn()


def endpoint_for(driver: MailSystemDriver, mailbox_id: str, *, readonly: bool,
                 pool: ConnectionPool | None = None,
                 pace: SystemPace | None = None) -> Endpoint:
    """IMAP when the driver offers it (pooled logins if `pool`, the system's limits and
    back-off if `pace`), else the driver's calls."""
    account = getattr(driver, "imap_account", None)
    if callable(account):
        value = account(mailbox_id)
        if isinstance(value, ImapAccount):
            direct = getattr(driver, "dovecot_direct_config", None)
            config = direct() if callable(direct) and not readonly else None
            if isinstance(config, str):  # a Dovecot of this machine: its Maildir written
                # a layout per copy, not per process: `reconcile --watch` runs for weeks,
                # and the admin's configuration may change under it (a plugin added)
                return DovecotDirectEndpoint(value, DovecotLayout(Path(config)), pool=pool,
                                             pace=pace)
            return ImapEndpoint(value, readonly=readonly, pool=pool, pace=pace)
    return DriverEndpoint(driver, mailbox_id, pace=pace)


def options_from_modes(modes: Modes, phase: str, target: str = "",
                       accepted: frozenset[str] | None = None) -> Options:
    """The policy's folderMap, verify mode and the store rewrites it accepts for the
    target system (`accepted` when the caller read them from the specs as they are now,
    else from the recorded modes), as mover options. Only a prestage pass may leave the
    target unread when the source is unchanged: E15 records "copied and verified" (state
    8, perhaps the last copy when the source is never deleted) and E41's final pass
    deletes BOX1, so both read the target every time."""
    rules = tuple(FolderRule(a, b) for a, b in modes.folder_map)
    if accepted is None:
        accepted = modes.accepted_rewrites(target)
    return Options(rules=rules, verify=modes.verify, phase=phase, accepted=accepted,
                   target_name=target, leave_target=phase == "prestage")


def throttle_for(system: str, modes: Modes) -> Throttle:
    """The throttle of a source system (one per system and process, limits from the modes)."""
    mps, bps = modes.throttle_messages_per_second, modes.throttle_bytes_per_second
    current = _THROTTLES.get(system)
    if current is None or (current.mps, current.bps) != (mps, bps):
        current = _THROTTLES[system] = Throttle(mps, bps)
    return current


_SHARE: Callable[[LocalPace], SystemPace] | None = None
_SHARED: dict[str, SystemPace] = {}


def share_paces(wrap: Callable[[LocalPace], SystemPace]) -> None:
    """From now on every system's pace is `wrap(its local pace)`: a worker shares the
    back-off with the fleet this way (`reconciler.workers.fleet.SharedPace`)."""
    global _SHARE
    _SHARE = wrap
    _SHARED.clear()


def pace_for(system: str, modes: Modes) -> SystemPace:
    """A system's pace in this process (one per system, shared by every copy to or from
    it; limits from the modes: the last recorded ones win, its back-off state is kept),
    or the fleet's around it once `share_paces` was called."""
    connections, per_user, per_day = modes.limits_of(system)
    limits = Limits(connections or None, per_user or None, per_day or None)
    current = _PACES.get(system)
    if current is None:
        current = _PACES[system] = LocalPace(system, limits)
    current.limits = limits
    if _SHARE is None:
        return current
    shared = _SHARED.get(system)
    if shared is None:
        shared = _SHARED[system] = _SHARE(current)
    return shared


def move_mail(src: MailSystemDriver, src_id: str, dst: MailSystemDriver, dst_id: str, *,
              key: str, modes: Modes, phase: str, manifest: Manifest | None,
              progress: Progress | None = None,
              accepted: frozenset[str] | None = None,
              throttle: Throttle | None = None) -> MailboxReport:
    """Copy and verify one mailbox; the report says what was copied, present, failed,
    and what the target altered on store (`accepted`: its rewrites the policy accepts).
    `throttle`: the source's pace (default: this process's, from the modes)."""
    mover = mover_loop()
    src_pace, dst_pace = pace_for(src.name, modes), pace_for(dst.name, modes)
    job = Job(key, lambda: endpoint_for(src, src_id, readonly=True, pool=mover.pool,
                                        pace=src_pace),
              lambda: endpoint_for(dst, dst_id, readonly=False, pool=mover.pool,
                                   pace=dst_pace),
              throttle=throttle or throttle_for(src.name, modes),
              options=options_from_modes(modes, phase, dst.name, accepted))

    async def go() -> MailboxReport:
        return (await run_jobs_async([job], manifest=manifest, progress=progress,
                                     parallel=1, retries=2))[0]

    return mover.run(go())
