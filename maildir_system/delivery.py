"""What the system does with one accepted message: store it, or redirect it through fed.

Why this is separate from the listeners: LMTP (from fed) and submission (from local users)
must apply exactly the same rules to a local recipient, otherwise a redirected mailbox would
redirect fed's mail but keep local users' mail (patent E9 requires both to follow BOX1 ->
BOX2). Both listeners call `Deliverer.deliver_local`.

Rules, per recipient, decided from the account table *at delivery time* (the admin driver may
have changed it a millisecond ago; it is read from SQLite each time):

- the account has ``redirect_to``: re-submit to fed (MAIL FROM kept, RCPT = redirect_to),
  store nothing, succeed only on fed's 250; fed down or 4xx -> 451 4.4.1, fed 5xx -> that 5xx;
- otherwise store into INBOX (tmp, fsync, rename, fsync dir) and succeed.

Submission has one more rule: an account marked ``via_fed`` (a mailbox whose addresses are
being moved, from E4 on the target and E5 on the source until the flip) is not served
locally when a local user writes to one of its access addresses; the message goes to fed
like any remote one, so that fed's hold and directory decide where it lands (invariant 2).
fed's own deliveries name the physical address and are always stored.

Within one transaction a mailbox gets the message once, however many of the recipients
resolve to it: the first outcome is reused for the others. Each stored or redirected message
is appended to the `deliveries` journal. All blocking work (SQLite, fsync, the SMTP relay)
runs in worker threads so one slow delivery never stalls the listeners.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys

from maildir_system.relay import relay
from maildir_system.store import INBOX, AccountRow, Store
from mailferry.mail.addresses import split_physical, unbracket
from mailferry.mail.messageid import message_id_of

log = logging.getLogger("maildir_system")


class Deliverer:
    """Delivery logic shared by the LMTP and submission listeners."""

    def __init__(self, store: Store, name: str, fed: tuple[str, int]) -> None:
        self.store = store
        self.name = name
        self.fed = fed
        self.in_flight = 0  # deliveries running; shutdown waits for them to finish

    async def resolve(self, address: str) -> AccountRow | None:
        """The local account an address reaches, or None."""
        return await asyncio.to_thread(self.store.resolve, address, self.name)

    def _store(self, account: AccountRow, rcpt: str, data: bytes) -> str:
        try:
            self.store.append(account.mailbox_id, INBOX, data)
        except Exception as exc:
            log.error("store for %s failed: %s", account.mailbox_id, exc)
            return "451 4.3.0 local storage failed, try again later"
        self._journal(account, rcpt, data, "stored", None)
        return f"250 2.0.0 stored in {account.mailbox_id}"

    def _journal(
        self, account: AccountRow, rcpt: str, data: bytes, action: str, detail: str | None
    ) -> None:
        # The message is already safe; a journal failure must not make the client retry
        # (that would duplicate it), so it is only logged.
        try:
            self.store.record_delivery(
                account.mailbox_id, rcpt, message_id_of(data),
                hashlib.sha256(data).hexdigest(), action, detail,
            )
        except Exception as exc:
            print(f"maildir-system {self.name}: journal write failed: {exc}", file=sys.stderr)

    def _redirect(self, account: AccountRow, mail_from: str, rcpt: str, data: bytes) -> str:
        target = account.redirect_to
        assert target is not None
        result = relay(self.fed, mail_from, [target], data)
        if result.ok:
            self._journal(account, rcpt, data, "redirected", target)
            return f"250 2.1.5 {account.mailbox_id} redirected to <{target}>"
        if result.permanent:
            return f"{result.code} {result.text}"
        return f"451 4.4.1 redirect to <{target}> deferred: fed said {result.code} {result.text}"

    def _is_physical(self, rcpt: str) -> bool:
        """True for a physical address of this system (`<mailbox id>@<name>.invalid`)."""
        physical = split_physical(unbracket(rcpt))
        return physical is not None and physical[0] == self.name.lower()

    def _deliver_account(self, account: AccountRow, mail_from: str, rcpt: str, data: bytes) -> str:
        if account.redirect_to:
            again = self.store.resolve(account.redirect_to, self.name)
            if again is None or again.mailbox_id != account.mailbox_id:
                return self._redirect(account, mail_from, rcpt, data)
            # A redirect to the mailbox itself would loop through fed forever: keep it here.
            log.warning("%s redirects to itself; storing locally", account.mailbox_id)
        return self._store(account, rcpt, data)

    async def deliver_local(
        self, mail_from: str, rcpts: list[str], data: bytes
    ) -> list[str]:
        """One status line per recipient, each mailbox served once per transaction."""
        self.in_flight += 1
        try:
            done: dict[str, str] = {}
            statuses: list[str] = []
            for rcpt in rcpts:
                account = await self.resolve(rcpt)
                if account is None:
                    # Removed between RCPT and DATA: temporary, fed re-resolves and retries.
                    statuses.append(f"451 4.3.0 <{rcpt}> no longer hosted here")
                    continue
                if account.mailbox_id not in done:
                    done[account.mailbox_id] = await asyncio.to_thread(
                        self._deliver_account, account, mail_from, rcpt, data
                    )
                statuses.append(done[account.mailbox_id])
            return statuses
        finally:
            self.in_flight -= 1

    async def submit(self, mail_from: str, rcpts: list[str], data: bytes) -> str:
        """Submission: one fed transaction for remote and redirected recipients, then store.

        Everything that leaves the system goes to fed in one all-or-none transaction *before*
        anything is stored locally, so a 4xx answer means nothing happened anywhere and the
        client's retry duplicates nothing.
        """
        self.in_flight += 1
        try:
            outgoing: list[str] = []
            redirected: list[tuple[AccountRow, str]] = []
            local: dict[str, tuple[AccountRow, str]] = {}
            for rcpt in rcpts:
                account = await self.resolve(rcpt)
                if account is None or (account.via_fed and not self._is_physical(rcpt)):
                    target = rcpt
                elif account.redirect_to:
                    target = account.redirect_to
                    if all(a.mailbox_id != account.mailbox_id for a, _ in redirected):
                        redirected.append((account, rcpt))
                else:
                    local.setdefault(account.mailbox_id, (account, rcpt))
                    continue
                if target.lower() not in (o.lower() for o in outgoing):
                    outgoing.append(target)
            if outgoing:
                result = await asyncio.to_thread(relay, self.fed, mail_from, outgoing, data)
                if result.permanent:
                    return f"{result.code} {result.text}"
                if not result.ok:
                    return f"451 4.4.1 relay deferred: fed said {result.code} {result.text}"
            for account, rcpt in redirected:
                await asyncio.to_thread(
                    self._journal, account, rcpt, data, "redirected", account.redirect_to
                )
            for account, rcpt in local.values():
                status = await asyncio.to_thread(self._store, account, rcpt, data)
                if not status.startswith("250"):
                    return status
            return "250 2.0.0 OK"
        finally:
            self.in_flight -= 1
