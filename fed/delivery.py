"""Delivery: resolve each pending recipient at delivery time and hand it to its system.

Invariant 2 says a message lands in the mailbox the directory names *at delivery time*, so
the route is never computed at reception: a scheduler pass on the event loop takes the due
recipients, skips the held ones, resolves the others (a physical address routes to itself,
any other address through the directory, the physical's system through the systems
registry) and starts one delivery task per recipient. The hold check, the in-flight
registration and the route lookup happen in one synchronous stretch (see ``holds.py``).

A delivery is one LMTP or SMTP transaction per recipient (smtplib, in a worker thread so
the loop keeps serving SMTP and the API): MAIL FROM is the original envelope sender, RCPT is
the physical address. LMTP gives one answer per recipient after DATA, which smtplib cannot
read for several recipients; one recipient per transaction keeps the answer unambiguous.

Duplicate elimination (as Postfix does): when two recipients of one message resolve to the
same physical address (an address and its alias, say), the mailbox gets the message once.
The second recipient waits while the first is in flight, and is marked done without a
second transaction once the delivery log shows the first delivered there.

Outcome: 2xx -> done; 5xx -> the copy goes to the shunt folder with the reason; anything
else (4xx, refused connection, timeout, unknown system) -> retry after a back-off that
doubles from ``retry_base`` up to ``retry_max``. Every attempt is appended to the
``deliveries`` log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import time
from dataclasses import dataclass

from . import metrics
from .addresses import split_physical
from .directory import Directory, System
from .holds import Holds
from .spool import PendingRecipient, Spool
from .store import Store

log = logging.getLogger("fed.delivery")


@dataclass(frozen=True)
class DeliverySettings:
    """Tunables of the delivery workers."""

    retry_base: float = 1.0
    retry_max: float = 60.0
    concurrency: int = 8
    timeout: float = 30.0
    helo_name: str = "fed.invalid"


@dataclass(frozen=True)
class Route:
    """Where one recipient goes now, or why it cannot go anywhere."""

    physical: str | None = None
    system: System | None = None
    failure_code: int = 0
    failure: str = ""


def send(system: System, mail_from: str, rcpt: str, data: bytes, settings: DeliverySettings
         ) -> tuple[int, str]:
    """One SMTP/LMTP transaction; (code, text), code 0 for a connection-level failure."""
    client: smtplib.SMTP
    try:
        if system.protocol == "lmtp":
            client = smtplib.LMTP(system.host, system.port, local_hostname=settings.helo_name,
                                  timeout=settings.timeout)
        else:
            client = smtplib.SMTP(system.host, system.port, local_hostname=settings.helo_name,
                                  timeout=settings.timeout)
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, _text(exc.smtp_error)
    except OSError as exc:
        return 0, f"cannot connect to {system.host}:{system.port}: {exc}"
    try:
        code, text = client.ehlo()
        if not 200 <= code < 300:
            return code, _text(text)
        options: list[str] = []
        if client.has_extn("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if client.has_extn("smtputf8") and not (mail_from + rcpt).isascii():
            options.append("SMTPUTF8")
        for code, text in (client.mail(mail_from, options), client.rcpt(rcpt)):
            if code not in (250, 251):
                return code, _text(text)
        code, text = client.data(data)
        return code, _text(text)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, _text(exc.smtp_error)
    except (OSError, smtplib.SMTPException) as exc:
        return 0, f"{system.host}:{system.port}: {exc or type(exc).__name__}"
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


class Deliverer:
    """The scheduler and its delivery tasks, all on the fed event loop."""

    def __init__(self, store: Store, spool: Spool, directory: Directory, holds: Holds,
                 settings: DeliverySettings) -> None:
        self.store = store
        self.spool = spool
        self.directory = directory
        self.holds = holds
        self.settings = settings
        self._wake = asyncio.Event()
        self._active: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._physical: dict[tuple[str, str], str | None] = {}  # where each active one goes
        self._stopping = False

    def wake(self) -> None:
        """Something changed (new mail, release, new system): schedule now."""
        self._wake.set()

    def retrying(self) -> int:
        """Pending recipients that have failed at least once."""
        rows = self.store.query(
            "SELECT COUNT(*) AS n FROM recipients WHERE status = 'pending' AND attempts > 0"
        )
        return int(rows[0]["n"])

    async def run(self) -> None:
        """Schedule due recipients until stop() is called."""
        while not self._stopping:
            self._wake.clear()
            self._schedule()
            # Whatever is due now was just started or is held or blocked by the concurrency
            # limit; those wake us (end of a delivery, release). Only future retries need a
            # timer, and the 1 s cap also covers holds on physical addresses.
            next_due = self.spool.next_due(after=time.time())
            delay = 1.0 if next_due is None else max(0.01, min(1.0, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def stop(self, grace: float) -> None:
        """Stop scheduling and let in-flight deliveries record their outcome."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._active.values())
        if tasks:
            log.info("waiting for %d in-flight deliveries", len(tasks))
            await asyncio.wait(tasks, timeout=grace)

    def route(self, rcpt: str) -> Route:
        """Resolve a recipient now: physical address, then its system's endpoint."""
        physical = rcpt if split_physical(rcpt) else self.directory.lookup(rcpt)
        if physical is None:
            return Route(failure_code=550, failure=f"550 5.1.1 <{rcpt}>: not in the directory")
        split = split_physical(physical)
        system = self.directory.system(split[0]) if split else None
        if system is None:
            return Route(physical, failure=f"no system registered for {physical}")
        return Route(physical, system)

    def _schedule(self) -> None:
        """Start deliveries for due recipients (synchronous: no await in here)."""
        free = self.settings.concurrency - len(self._active)
        if free <= 0 or self._stopping:
            return
        for item in self.spool.due(time.time(), limit=free + len(self._active) + 50):
            key = (item.queue_id, item.rcpt)
            if key in self._active:
                continue
            if self.holds.is_held(item.rcpt):
                continue
            route = self.route(item.rcpt)
            watched = [item.rcpt] + ([route.physical] if route.physical else [])
            if self.holds.is_held(*watched):
                continue
            if route.physical is not None and self._same_mailbox(item, route.physical):
                continue
            self.holds.begin(watched)
            task = asyncio.create_task(self._deliver(item, route, watched))
            self._physical[key] = route.physical
            self._active[key] = task
            if len(self._active) >= self.settings.concurrency:
                return

    def _same_mailbox(self, item: PendingRecipient, physical: str) -> bool:
        """True when another recipient of this message covers `physical`: in flight (wait)
        or already delivered there (then this one is done, logged as a duplicate)."""
        if any(key[0] == item.queue_id and where == physical
               for key, where in self._physical.items()):
            return True
        rows = self.store.query(
            "SELECT rcpt FROM deliveries WHERE queue_id = ? AND physical = ? "
            "AND result = 'delivered' LIMIT 1", (item.queue_id, physical))
        if not rows:
            return False
        first = str(rows[0]["rcpt"])
        self.spool.mark_done(item.queue_id, item.rcpt)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO deliveries (at, queue_id, rcpt, physical, system, message_id, "
                "result, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), item.queue_id, item.rcpt, physical, None, item.message_id,
                 "duplicate", f"same mailbox as <{first}>: delivered once"),
            )
        log.info("%s <%s> -> %s: duplicate of <%s>, not delivered twice", item.queue_id,
                 item.rcpt, physical, first)
        return True

    async def _deliver(self, item: PendingRecipient, route: Route, watched: list[str]) -> None:
        """Attempt one recipient and record the outcome."""
        try:
            if route.system is None or route.physical is None:
                code, text = route.failure_code, route.failure
            else:
                data = await asyncio.to_thread(self.spool.read, item.queue_id)
                code, text = await asyncio.to_thread(
                    send, route.system, item.mail_from, route.physical, data, self.settings
                )
            await self._record(item, route, code, text)
        except Exception:
            log.exception("delivery of %s to %s failed unexpectedly", item.queue_id, item.rcpt)
            self._retry(item, "internal error, see fed log")
        finally:
            self._active.pop((item.queue_id, item.rcpt), None)
            self._physical.pop((item.queue_id, item.rcpt), None)
            await self.holds.end(watched)
            self._wake.set()

    async def _record(self, item: PendingRecipient, route: Route, code: int, text: str) -> None:
        """Turn an SMTP answer into done / shunted / retry, and log it."""
        system = route.system.name if route.system else None
        detail = f"{code} {text}".strip() if code else text
        if 200 <= code < 300:
            result = "delivered"
            self.spool.mark_done(item.queue_id, item.rcpt)
            log.info("%s <%s> -> %s: %s", item.queue_id, item.rcpt, route.physical, detail)
        elif 500 <= code < 600:
            result = "shunted"
            path = await asyncio.to_thread(self.spool.shunt, item.queue_id, item.rcpt, code, detail)
            self.spool.mark_shunted(item.queue_id, item.rcpt, code, detail, path)
            log.warning("%s <%s> -> %s refused, shunted to %s: %s", item.queue_id, item.rcpt,
                        route.physical, path.name, detail)
        else:
            result = "deferred"
            delay = self._retry(item, detail)
            log.info("%s <%s> -> %s deferred (retry in %.1fs): %s", item.queue_id, item.rcpt,
                     route.physical, delay, detail)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO deliveries (at, queue_id, rcpt, physical, system, message_id, "
                "result, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), item.queue_id, item.rcpt, route.physical, system,
                 item.message_id, result, detail),
            )
        metrics.count_delivery(result, system, item.queue_id)

    def _retry(self, item: PendingRecipient, error: str) -> float:
        """Schedule the next attempt with doubling back-off; return the delay."""
        attempts = item.attempts + 1
        delay = min(self.settings.retry_max, self.settings.retry_base * 2.0 ** (attempts - 1))
        self.spool.mark_retry(item.queue_id, item.rcpt, attempts, time.time() + delay, error)
        return delay

    def log_rows(self, rcpt: str | None, since: float | None, limit: int
                 ) -> list[dict[str, object]]:
        """Delivery log rows, oldest first, optionally for one recipient / after a time."""
        sql = "SELECT * FROM deliveries WHERE 1=1"
        params: list[object] = []
        if rcpt:
            sql += " AND (rcpt = ? OR physical = ?)"
            params += [rcpt, rcpt]
        if since is not None:
            sql += " AND at >= ?"
            params.append(since)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [dict(r) for r in self.store.query(sql, tuple(params))]
