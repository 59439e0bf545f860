"""E3-E9: the cutover, the heart of the patent.

E4 forms the old addresses on BOX2 (through the contacts table, as the patent says), sets
the syncfed marker and drops the BOX2 -> BOX1 redirect. E5-E8 up-sync every system, let fed
verify that the target really lists BOX2 with those addresses, and hold them: from the hold
on, fed delivers nothing for them anywhere. E9 flips the directory to BOX2, releases the held
mail (which therefore goes to BOX2) and redirects BOX1 to BOX2 for the source's local users.

Order matters and every part is idempotent, so a crash between any two calls is harmless:
flip before release (held mail must find the new address), redirect after flip (BOX1's
redirect must not loop back to BOX1), and before the flip fed proves the target takes ADP2
on a fresh session (invariant 9, `StepContext.prove_delivery`). What need not wait in the
hold does not: the engine runs E9 right after E5-E8, whose pings E9 does not repeat, and the
target's via_fed mark is cleared after the release.

Local mail. A system that delivers its own users' mail for a local address by itself (Postfix
with an alias map, the embedded system's submission) would bypass fed: from E4 BOX2's system
would store mail for AD1 in BOX2 while the directory still names BOX1, and between the hold
and the flip BOX1's system would store it in BOX1 past the hold. So the target routes its
local users' mail for the moved addresses through fed from E4 (before it learns them) until
the flip, and the source does so from E5 (before the hold) on: fed's hold and directory then
decide for every message, wherever it was written (``set_via_fed``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from reconciler.drivers.base import Contact
from reconciler.errors import PermanentError, TemporaryError
from reconciler.fedclient import FlipResult, HoldResult, ReleaseResult
from reconciler.state.model import Migration
from reconciler.state.states import MigrationState
from reconciler.steps.base import Outcome, StepContext, addresses_of, new_physical, old_physical


def e4_form_addresses(ctx: StepContext, m: Migration) -> Outcome:
    """E3/E4: the window is open (the plan checked it): AD1 and aliases on BOX2."""
    target = ctx.driver(m.target_system)
    target.ping()
    account = target.get_account(m.target_mailbox)
    if account is None:
        raise PermanentError("BOX2 disappeared from the target", address=m.address, step="E4")
    wanted = set(addresses_of(m))
    target.set_via_fed(m.target_mailbox, True)  # before BOX2 learns AD1: see the docstring
    if set(account.all_addresses) != wanted:
        # The patent's contacts table TC: fed's contact for AD1 arrives in TC, its addresses
        # become BOX2's access addresses, then the contact is deleted.
        target.put_contact(Contact(m.address, tuple(m.aliases)))
        target.set_addresses(m.target_mailbox, (m.address,), tuple(m.aliases))
    target.delete_contact(m.address)
    if not account.syncfed:
        target.set_syncfed(m.target_mailbox, True)
    if account.redirect_to is not None:
        target.set_redirect(m.target_mailbox, None)
    ctx.prove_delivery(m.target_system, new_physical(m), m, "E4")
    ctx.changed(m.target_system)
    return Outcome(MigrationState.ADDRESSES_FORMED, "E4",
                   {"addresses": sorted(wanted), "syncfed": True})


# A wave's cutover in one pass (`reconciler.engine`): the E5-E8 checks of every mailbox,
# then one hold for all of them, then one batch flip (fed's POST /v1/flips: one
# transaction, all or nothing) and one release. Each hold then lasts the wave's E9 (a few
# calls), not one call per mailbox; a wave is at most this many mailboxes.
WAVE = 1000


def e5_prepare(ctx: StepContext, m: Migration) -> None:
    """E5-E7 for one mailbox, up to (not including) the hold: the syncfed marker, every
    system's up-sync, fed's verification, and the source's local mail through fed."""
    target = ctx.driver(m.target_system)
    account = target.get_account(m.target_mailbox)
    if account is None or not account.syncfed:  # E5: the list comes from the syncfed marker
        raise PermanentError("BOX2 has no syncfed marker: E4 did not complete",
                             address=m.address, step="E5")
    for system in sorted(ctx.specs.systems):  # E6: every system up-syncs
        ctx.upsync(system)
    ctx.ping(m.source_system)  # E9 follows at once: its checks are done before the hold
    ctx.ping(m.target_system)
    result = ctx.fed.verify(m.target_system, new_physical(m), addresses_of(m))  # E7
    if not result.ok:  # E8 negative: the patent stops this migration
        raise PermanentError(f"fed's verification failed: {result.reason}",
                             address=m.address, step="E8")


def _by_system(wave: list[Migration], system_of: Callable[[Migration], str]
               ) -> dict[str, list[Migration]]:
    found: dict[str, list[Migration]] = {}
    for m in wave:
        found.setdefault(system_of(m), []).append(m)
    return dict(sorted(found.items()))


def hold_wave(ctx: StepContext, wave: list[Migration]) -> HoldResult:
    """E8 for the prepared mailboxes of a wave: the sources' local users' mail for them must
    reach the hold too, not BOX1 directly (via_fed, one call per source system); no session
    to a source predates that change; then one hold of every address (it answers once
    nothing is in flight)."""
    for system, mine in _by_system(wave, lambda m: m.source_system).items():
        ctx.driver(system).set_via_fed_many([m.source_mailbox for m in mine], True)
        ctx.fed.refresh_system(system)
    return ctx.fed.hold([a for m in wave for a in addresses_of(m)])


def e5_held(m: Migration, held: HoldResult) -> Outcome:
    """The outcome of E5-E8 for one mailbox of a hold that took effect."""
    # The instant the hold took effect (in-flight deliveries finished), not when it was asked.
    since = datetime.fromisoformat(held.effective.replace("Z", "+00:00"))
    if m.hold_started_at is None:
        m.hold_started_at = since if since.tzinfo else since.replace(tzinfo=UTC)
    return Outcome(MigrationState.HELD, "E5-E8", {"held": addresses_of(m), "since": held.since})


def e5_verify_and_hold(ctx: StepContext, m: Migration) -> Outcome:
    """E5-E8: up-sync, fed verifies the target's list, then holds AD1 and its aliases."""
    e5_prepare(ctx, m)
    return e5_held(m, hold_wave(ctx, [m]))


def e9_check(ctx: StepContext, m: Migration) -> None:
    """Before the flip: the redirect after it must be possible (skipped when E5 just
    pinged them in this pass: this runs inside the hold, every call lengthens it)."""
    ctx.ping(m.source_system)
    ctx.ping(m.target_system)


PROBE = 100  # physical addresses fed probes on one fresh session (RCPTs of one transaction)


def prove_wave(ctx: StepContext, wave: list[Migration]) -> list[Migration]:
    """Invariant 9 for a wave: each target takes its ADP2s on fed's path, on a session opened
    after its last change (a probe of up to `PROBE` addresses per call). Returns the
    mailboxes proved; when a probe is refused, its mailboxes are left out, for the caller to
    prove one by one (so that only the refused ones wait, with the system's reply)."""
    ready: list[Migration] = []
    for system, mine in _by_system(wave, lambda m: m.target_system).items():
        for k in range(0, len(mine), PROBE):
            chunk = mine[k:k + PROBE]
            try:
                ctx.fed.refresh_system(system, [new_physical(m) for m in chunk])
            except TemporaryError:
                continue
            ready.extend(chunk)
    return ready


def flip_wave(ctx: StepContext, wave: list[Migration]) -> list[FlipResult]:
    """E9's flip for a wave: ADP1 -> ADP2 for every mailbox in one transaction of fed's
    directory (all or nothing: a refused batch changes no entry)."""
    return ctx.fed.flip_many([(addresses_of(m), old_physical(m), new_physical(m))
                              for m in wave])


def redirect_wave(ctx: StepContext, wave: list[Migration]) -> None:
    """After the flip, before the release: BOX1 redirects to BOX2 (one call per source
    system: it runs inside the hold). Setting a redirect already set changes nothing."""
    for system in sorted({m.source_system for m in wave}):
        ctx.driver(system).set_redirects({m.source_mailbox: new_physical(m) for m in wave
                                          if m.source_system == system})


def release_wave(ctx: StepContext, wave: list[Migration]) -> tuple[dict[str, int],
                                                                   ReleaseResult]:
    """After the flips and redirects: mail fed still sends to an ADP1 (a physical address
    routes to itself, held mail too) must meet the redirect, so no session to a source
    predates it; then the messages waiting per held address (for the wave report) and one
    release of every address."""
    for system in sorted({m.source_system for m in wave}):
        ctx.fed.refresh_system(system)
    held = ctx.fed.holds()
    waiting = {a: h.waiting for a, h in held.items()}
    return waiting, ctx.fed.release([a for m in wave for a in addresses_of(m)])


def after_release(ctx: StepContext, wave: list[Migration]) -> None:
    """After the release (it need not lengthen the hold): the targets' local users' mail for
    the moved addresses went through fed, whose directory names BOX2 now; from here the
    target's own server keeps it (via_fed off, one call per target system)."""
    for system, mine in _by_system(wave, lambda m: m.target_system).items():
        ctx.driver(system).set_via_fed_many([m.target_mailbox for m in mine], False)


def e9_released(ctx: StepContext, m: Migration, flipped: FlipResult, waiting: dict[str, int],
                released: ReleaseResult) -> Outcome:
    """The outcome of E9 for one mailbox of a released wave (after `after_release`)."""
    ctx.cache.downsync_needed = True
    if m.address_migration_id is None:
        m.address_migration_id = uuid.uuid4().hex
    mine = addresses_of(m)
    return Outcome(MigrationState.FLIPPED, "E9",
                   {"from": old_physical(m), "to": new_physical(m),
                    "flipped": flipped.flipped,
                    "address_migration_id": m.address_migration_id,
                    "released_messages": sum(waiting.get(a, 0) for a in mine),
                    "held_seconds": max((released.held_seconds[a] for a in mine
                                         if a in released.held_seconds), default=0.0)})


def e9_flip(ctx: StepContext, m: Migration) -> Outcome:
    """E9: directory ADP1 -> ADP2, release the hold, redirect BOX1 -> BOX2."""
    e9_check(ctx, m)
    # Invariant 9: the target takes ADP2 on fed's path, on a session opened after its last
    # change, and no connection fed keeps to it predates that change.
    ctx.prove_delivery(m.target_system, new_physical(m), m, "E9")
    flipped = flip_wave(ctx, [m])[0]
    redirect_wave(ctx, [m])
    waiting, released = release_wave(ctx, [m])
    after_release(ctx, [m])
    return e9_released(ctx, m, flipped, waiting, released)
