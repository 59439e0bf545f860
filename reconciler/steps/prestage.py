"""E1 (record the migration), E2 (pre-create BOX2) and the creation of new mailboxes.

E2 may run days before the window ("prestage"): BOX2 gets only its internal address AD2 and
a redirect to BOX1, so that colleagues on the target system who already write to AD2 reach
the user where the user still reads mail.
"""

from __future__ import annotations

from mailferry.mail.addresses import mailbox_id_for, split_physical
from reconciler.drivers.base import MailSystemDriver
from reconciler.errors import ManualStep, PermanentError
from reconciler.mover.service import forget_logins
from reconciler.spec.model import DesiredMailbox
from reconciler.state.model import Migration
from reconciler.state.states import MigrationState
from reconciler.steps.base import Outcome, StepContext, new_physical, old_physical


def internal_address(ctx: StepContext, m: Migration) -> str:
    """AD2: `<local part>@<internal domain of the target>`."""
    system = ctx.specs.systems[m.target_system]
    return f"{m.address.partition('@')[0]}@{system.internal_domain}"


def e1_record_migration(ctx: StepContext, want: DesiredMailbox) -> Outcome:
    """E1: a new migration row (state 0) from the specs and fed's directory."""
    m = record_migration(ctx, want, ctx.fed.lookup(want.address) or "")
    return Outcome(MigrationState.RECORDED, "E1",
                   {"source": m.source_system, "target": m.target_system, "window": m.window,
                    "modes": m.modes.to_json()}, message="migration recorded", migration=m)


def record_migration(ctx: StepContext, want: DesiredMailbox, physical: str) -> Migration:
    """The migration row of E1, from the specs and the directory's physical address."""
    where = split_physical(physical)
    if where is None:
        raise PermanentError(f"fed's directory gives no physical address: {physical!r}",
                             address=want.address, step="E1")
    source_system, source_mailbox = where
    aliases = list(want.aliases)
    if source_system in ctx.drivers:
        account = ctx.drivers[source_system].get_account(source_mailbox)
        if account is not None:  # keep every address the old mailbox answers to
            for extra in account.all_addresses:
                if extra != want.address and extra not in aliases:
                    aliases.append(extra)
    m = Migration(
        address=want.address, aliases=aliases, source_system=source_system,
        target_system=want.system, source_mailbox=source_mailbox,
        target_mailbox=mailbox_id_for(want.address), placement=want.placement,
        window=want.window.name if want.window else None, modes=want.policy.modes(),
        station=want.station, state=MigrationState.RECORDED, state_since=ctx.now,
    )
    ctx.session.add(m)
    ctx.session.flush()
    return m


def check_target_empty(ctx: StepContext, m: Migration, target: MailSystemDriver) -> None:
    """BOX2 on a system mailferry does not administer (its provider provisioned it) must be
    empty, or hold only what this migration already copied (a re-run, a crash after a
    copy): every message there must be one of BOX1's, by Message-ID (by content where it
    has none). Anything else is someone's mail that mailferry must not mix with the
    migrated one: a PermanentError naming the address, the step and an example."""
    source = ctx.driver(m.source_system)
    foreign: list[tuple[str, str]] = []
    known: tuple[set[str], set[str]] | None = None
    for folder in target.list_folders(m.target_mailbox):
        for msg in target.list_messages(m.target_mailbox, folder):
            if known is None:  # read BOX1 only when BOX2 holds something
                ids: set[str] = set()
                hashes: set[str] = set()
                for src_folder in source.list_folders(m.source_mailbox):
                    for src in source.list_messages(m.source_mailbox, src_folder):
                        hashes.add(src.sha256)
                        if src.message_id:
                            ids.add(src.message_id)
                known = ids, hashes
            if not (msg.message_id in known[0] if msg.message_id else msg.sha256 in known[1]):
                foreign.append((folder, msg.message_id or f"(no Message-ID, {msg.size} bytes)"))
    if foreign:
        folder, example = foreign[0]
        raise PermanentError(
            f"the mailbox on {m.target_system} already holds {len(foreign)} message"
            f"{'s' if len(foreign) != 1 else ''} that {'are' if len(foreign) != 1 else 'is'}"
            f" not from {m.source_system} (e.g. {example} in {folder}): mailferry moves "
            "only into an empty mailbox or one it partly filled itself; empty it there (or "
            "place the address elsewhere), then reconcile retry", address=m.address,
            step="E2")


def e2_create_target(ctx: StepContext, m: Migration) -> Outcome:
    """E2: BOX2 exists on the target with AD2 and a redirect BOX2 -> BOX1. On a system whose
    provider creates the mailboxes, BOX2 is found, not created: missing, it is a manual step
    (the driver's ManualStep), present, it must be empty or partly filled by this
    migration."""
    target = ctx.driver(m.target_system)
    target.ping()
    ad2 = internal_address(ctx, m)
    diary_only = m.modes.diary_only
    redirect = None if diary_only else old_physical(m)
    account = target.get_account(m.target_mailbox)
    if account is None:
        forget_logins(target, m.target_mailbox)  # a session on an earlier mailbox of that id
        try:
            account = target.create_mailbox(m.target_mailbox, internal_address=ad2,
                                            redirect_to=redirect)
        except ManualStep as exc:
            raise ManualStep(exc.task, exc.why, delay=exc.delay, address=m.address,
                             step="E2") from exc
    if account.syncfed:  # (a mailbox created just now has no marker)
        raise PermanentError(
            f"{m.target_system} already has a mailbox {m.target_mailbox} that took over "
            "addresses (syncfed set) outside this migration", address=m.address, step="E2")
    if not target.creates_mailboxes:
        check_target_empty(ctx, m, target)
    if account.redirect_to != redirect:
        target.set_redirect(m.target_mailbox, redirect)
    ctx.prove_delivery(m.target_system, new_physical(m), m, "E2")  # early: days before the flip
    return Outcome(MigrationState.PRESTAGED, "E2",
                   {"mailbox": m.target_mailbox, "internal_address": ad2,
                    "redirect": redirect})


def create_mailbox(ctx: StepContext, want: DesiredMailbox) -> Outcome:
    """A new address in the specs: create its mailbox and register it in fed's directory."""
    driver = ctx.driver(want.system)
    mailbox_id = mailbox_id_for(want.address)
    account = driver.get_account(mailbox_id)
    if account is None:
        # Nothing before the system answers as fed and the mover will reach it (its TLS
        # and certificate too): a mailbox fed cannot deliver to is not created.
        ctx.ping(want.system)
        try:
            account = driver.create_mailbox(mailbox_id, access_addresses=(want.address,))
        except ManualStep as exc:  # its provider creates it (a hosted system)
            raise ManualStep(exc.task, exc.why, delay=exc.delay, address=want.address,
                             step="create") from exc
    if set(account.all_addresses) != {want.address, *want.aliases}:
        driver.set_addresses(mailbox_id, (want.address,), want.aliases)
    # fed learns it from the up-sync at the end of this pass; the next plan checks that the
    # directory has it (and would simply run this idempotent step again if not).
    ctx.changed(want.system)
    return Outcome(None, "create", {"system": want.system, "mailbox": mailbox_id,
                                    "physical": account.physical_address},
                   message=f"created on {want.system}")
