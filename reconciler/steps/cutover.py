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
from datetime import UTC, datetime

from reconciler.drivers.base import Contact
from reconciler.errors import PermanentError
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


def e5_verify_and_hold(ctx: StepContext, m: Migration) -> Outcome:
    """E5-E8: up-sync, fed verifies the target's list, then holds AD1 and its aliases."""
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
    # The source's local users' mail for AD1 must reach the hold too, not BOX1 directly.
    ctx.driver(m.source_system).set_via_fed(m.source_mailbox, True)
    ctx.fed.refresh_system(m.source_system)  # no session predating that change
    held = ctx.fed.hold(addresses_of(m))
    # The instant the hold took effect (in-flight deliveries finished), not when it was asked.
    since = datetime.fromisoformat(held.effective.replace("Z", "+00:00"))
    if m.hold_started_at is None:
        m.hold_started_at = since if since.tzinfo else since.replace(tzinfo=UTC)
    return Outcome(MigrationState.HELD, "E5-E8", {"held": held.held, "since": held.since})


def e9_flip(ctx: StepContext, m: Migration) -> Outcome:
    """E9: directory ADP1 -> ADP2, release the hold, redirect BOX1 -> BOX2."""
    old, new = old_physical(m), new_physical(m)
    source, target = ctx.driver(m.source_system), ctx.driver(m.target_system)
    # Before the flip: the redirect below must be possible right after it (skipped when E5
    # just pinged them in this pass: this runs inside the hold, every call lengthens it).
    ctx.ping(m.source_system)
    ctx.ping(m.target_system)
    # Invariant 9: the target takes ADP2 on fed's path, on a session opened after its last
    # change, and no connection fed keeps to it predates that change.
    ctx.prove_delivery(m.target_system, new, m, "E9")
    flipped = ctx.fed.flip(addresses_of(m), old, new)
    account = source.get_account(m.source_mailbox)
    if account is not None and account.redirect_to != new:
        source.set_redirect(m.source_mailbox, new)
    # Mail fed still sends to ADP1 (a physical address routes to itself, held mail too)
    # must meet the redirect: no session to the source that predates it.
    ctx.fed.refresh_system(m.source_system)
    held = ctx.fed.holds()  # for the wave report: how much mail waited in the hold
    waiting = sum(h.waiting for a, h in held.items() if a in set(addresses_of(m)))
    released = ctx.fed.release(addresses_of(m))
    # After the release (it need not lengthen the hold): the target's local users' mail for
    # AD1 went through fed, whose directory names BOX2 now; from here Postfix keeps it.
    target.set_via_fed(m.target_mailbox, False)
    ctx.cache.downsync_needed = True
    if m.address_migration_id is None:
        m.address_migration_id = uuid.uuid4().hex
    return Outcome(MigrationState.FLIPPED, "E9",
                   {"from": old, "to": new, "flipped": flipped.flipped,
                    "address_migration_id": m.address_migration_id,
                    "released_messages": waiting,
                    "held_seconds": max(released.held_seconds.values(), default=0.0)})
