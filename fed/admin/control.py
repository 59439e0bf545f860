"""fed's HTTP control API: how the reconciler (and an admin with curl) drives the hub.

The reconciler never touches fed's files; everything it needs for the patent's steps is a
JSON route here: directory entries, systems, up-sync / down-sync / verify (E5-E8), holds,
release and flip (E8-E9), queue and delivery-log inspection. Documented route by route in
``docs/fed-api.md``.

Security (invariant 8): every route, health included, needs ``Authorization: Bearer
<token>``; the token is compared in constant time. The API is meant to listen on loopback
or a private network only. The one exception is ``GET /metrics`` when fed runs with
``--metrics-public`` (Prometheus scrapers are often configured without secrets; the
metrics hold counts, never addresses).

Queue administration (``/v1/queue/...``, used by ``fed queue``) is ``queueadmin.py``.

Error shape: ``{"error": "..."}`` with 400 for bad input, 401 for a bad token, 404 for a
missing entry, 409 for a request that contradicts the current state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mailferry.mail.addresses import split_physical

from ..delivery.scheduler import Deliverer
from ..delivery.smtpclient import ClientError, Connection, Reply
from ..queue.spool import QuarantineError, Spool
from ..routing.directory import (
    Directory,
    DirectoryConflict,
    DirectoryError,
    check_address,
    check_physical,
)
from ..routing.holds import HoldRefused, Holds
from ..routing.shared_db import Fenced, current_fence, fence_token
from ..telemetry import metrics
from .queueadmin import QueueAdmin

log = logging.getLogger("fed.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{1,64}$")
FENCE_HEADER = "Mailferry-Fence"
_FENCE = re.compile(r"^([A-Za-z0-9._-]{1,64})/([0-9]{1,18})$")  # LEASE-ID/GENERATION
MAX_FLIPS = 10_000  # flips in one POST /v1/flips (a wave; the body is bounded anyway)


def iso(ts: float) -> str:
    """An epoch time as ISO 8601 UTC."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def parse_time(raw: str) -> float:
    """Epoch seconds from an ISO 8601 time or a number."""
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DirectoryError(f"bad time {raw!r}: use ISO 8601 or epoch seconds") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DirectoryError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DirectoryError("body must be a JSON object")
    return data


def _addresses(data: dict[str, Any]) -> list[str]:
    raw = data.get("addresses")
    if not isinstance(raw, list) or not raw:
        raise DirectoryError("'addresses' must be a non-empty list of addresses")
    return list(dict.fromkeys(check_address(a) for a in raw))


class ControlAPI:
    """The aiohttp application and its handlers."""

    def __init__(self, token: str, directory: Directory, spool: Spool, holds: Holds,
                 deliverer: Deliverer, hold_timeout: float = 120.0,
                 metrics_public: bool = False, node: str = "") -> None:
        self.token = token.encode()
        self.directory = directory
        self.spool = spool
        self.holds = holds
        self.deliverer = deliverer
        self.hold_timeout = hold_timeout
        self.metrics_public = metrics_public
        self.node = node  # this node's name: every queue answer carries it (fed queue)
        self.admin = QueueAdmin(spool, directory, holds)

    def app(self) -> web.Application:
        """Build the aiohttp application."""
        app = web.Application(middlewares=[self._auth, self._fencing, self._errors],
                              client_max_size=16 << 20)
        r = app.router
        r.add_get("/v1/health", self.health)
        r.add_get("/v1/directory", self.directory_all)
        r.add_get("/v1/directory/{address}", self.directory_get)
        r.add_put("/v1/directory/{address}", self.directory_put)
        r.add_delete("/v1/directory/{address}", self.directory_delete)
        r.add_get("/v1/systems", self.systems_get)
        r.add_put("/v1/systems/{name}", self.systems_put)
        r.add_post("/v1/systems/{name}/refresh", self.systems_refresh)
        r.add_get("/v1/refusals", self.refusals)
        r.add_post("/v1/upsync", self.upsync)
        r.add_get("/v1/downsync", self.downsync)
        r.add_post("/v1/verify", self.verify)
        r.add_get("/v1/holds", self.holds_get)
        r.add_post("/v1/holds", self.holds_post)
        r.add_post("/v1/release", self.release)
        r.add_post("/v1/flip", self.flip)
        r.add_post("/v1/flips", self.flips)
        r.add_get("/v1/queue", self.queue)
        r.add_get("/v1/queue/messages", self.queue_list)
        r.add_get("/v1/queue/messages/{queue_id}", self.queue_show)
        r.add_delete("/v1/queue/messages/{queue_id}", self.queue_delete)
        r.add_post("/v1/queue/messages/{queue_id}/hold", self.queue_hold)
        r.add_post("/v1/queue/messages/{queue_id}/release", self.queue_release)
        r.add_post("/v1/queue/flush", self.queue_flush)
        r.add_get("/v1/queue/quarantine", self.quarantine_list)
        r.add_post("/v1/queue/quarantine/{queue_id}/requeue", self.quarantine_requeue)
        r.add_get("/v1/deliveries", self.deliveries)
        r.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.metrics_public and request.path == "/metrics" and request.method == "GET":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.token):
            log.warning("refused control request %s %s from %s: bad token", request.method,
                        request.path, request.remote)
            return _json({"error": "missing or wrong bearer token"}, 401)
        return await handler(request)

    @web.middleware
    async def _fencing(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A mutating call carrying `Mailferry-Fence: LEASE/N` (the id of the reconciler's
        lease and its generation) is refused (409, "fenced": true) when fed has seen a
        higher N for that lease; every shared write it makes checks N again in its own
        transaction (shared_db.fence_token). Calls without the header (an admin's curl,
        `fed queue`) are not fenced."""
        raw = request.headers.get(FENCE_HEADER)
        if raw is None or request.method in ("GET", "HEAD"):
            return await handler(request)
        match = _FENCE.fullmatch(raw.strip())
        if match is None:
            return _json({"error": f"{FENCE_HEADER} must be LEASE-ID/GENERATION"}, 400)
        lease, given = match.group(1), int(match.group(2))
        try:
            with self.directory.shared.read() as db:
                current = current_fence(db, lease)
            if given < current:  # early and read-only: the write path checks again
                raise Fenced(given, current)
            token = fence_token.set((lease, given))
            try:
                return await handler(request)
            finally:
                fence_token.reset(token)
        except Fenced as exc:
            log.warning("refused %s %s: %s", request.method, request.path, exc)
            return _json({"error": str(exc), "fenced": True, "current": exc.current}, 409)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except DirectoryConflict as exc:
            return _json({"error": str(exc)}, 409)
        except DirectoryError as exc:
            return _json({"error": str(exc)}, 400)

    # -- health, directory, systems ------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """Liveness plus a summary."""
        return _json({"ok": True, "version": self.directory.version(),
                      "queue": self._queue_counts()})

    async def directory_all(self, request: web.Request) -> web.Response:
        """Every directory entry."""
        return _json({"version": self.directory.version(), "entries": self.directory.entries()})

    async def directory_get(self, request: web.Request) -> web.Response:
        """One directory entry (404 if absent)."""
        address = check_address(request.match_info["address"])
        physical = self.directory.lookup(address)
        if physical is None:
            return _json({"error": f"{address} is not in the directory"}, 404)
        return _json({"address": address, "physical": physical})

    async def directory_put(self, request: web.Request) -> web.Response:
        """Create or replace one entry."""
        address = check_address(request.match_info["address"])
        if split_physical(address):
            raise DirectoryError("a physical address routes to itself; it needs no entry")
        physical = check_physical((await _body(request)).get("physical"))
        changed = self.directory.put(address, physical)
        self.deliverer.wake()
        return _json({"address": address, "physical": physical, "changed": changed,
                      "version": self.directory.version()})

    async def directory_delete(self, request: web.Request) -> web.Response:
        """Remove one entry (idempotent)."""
        address = check_address(request.match_info["address"])
        deleted = self.directory.delete(address)
        return _json({"address": address, "deleted": deleted,
                      "version": self.directory.version()})

    async def systems_get(self, request: web.Request) -> web.Response:
        """Every registered system."""
        return _json({"systems": [vars(s) for s in self.directory.systems()]})

    async def systems_put(self, request: web.Request) -> web.Response:
        """Register or update a system's delivery endpoint."""
        data = await _body(request)
        host, port, protocol = data.get("host"), data.get("port"), data.get("protocol", "lmtp")
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool) \
                or not isinstance(protocol, str):
            raise DirectoryError("body needs 'host' (string), 'port' (integer), 'protocol'")
        tls, cafile = data.get("tls", "none"), data.get("cafile")
        if not isinstance(tls, str) or not (cafile is None or isinstance(cafile, str)):
            raise DirectoryError("'tls' must be a string, 'cafile' a string or null")
        auth_user, auth_file, rcpt = data.get("auth_user"), data.get("auth_file"), \
            data.get("rcpt", "")
        if not all(v is None or isinstance(v, str) for v in (auth_user, auth_file)) \
                or not isinstance(rcpt, str):
            raise DirectoryError("'auth_user' and 'auth_file' must be strings or null, "
                                 "'rcpt' a string")
        system = self.directory.put_system(request.match_info["name"], host, port, protocol,
                                           tls=tls, cafile=cafile, auth_user=auth_user,
                                           auth_file=auth_file, rcpt=rcpt)
        self.deliverer.wake()
        return _json(vars(system))

    async def systems_refresh(self, request: web.Request) -> web.Response:
        """The system's tables changed: retire every pooled connection to it (on every node:
        the generation is in the shared database), then, with ``probe``, ask it on a fresh
        session whether it takes these physical addresses (MAIL, RCPT, RSET: no message).

        409 when one is refused, with each reply: the reconciler must not flip to it."""
        name = request.match_info["name"].lower()
        data = await _body(request) if request.can_read_body else {}
        raw = data.get("probe", [])
        if not isinstance(raw, list):
            raise DirectoryError("'probe' must be a list of physical addresses")
        probe = list(dict.fromkeys(check_physical(a, "probe") for a in raw))
        for physical in probe:
            if split_physical(physical) != (name, physical.partition("@")[0]):
                raise DirectoryError(f"{physical} is not a physical address of {name}")
        system = self.directory.refresh_system(name)
        if system is None:
            return _json({"error": f"no system {name!r} is registered"}, 404)
        replies: dict[str, Reply] = {}
        if probe:
            settings = self.deliverer.settings
            try:
                conn = await Connection.for_system(system, settings.helo_name,
                                                   settings.timeout)
                try:
                    asked = await conn.check("", [system.recipient(p) for p in probe])
                    replies = {p: asked[system.recipient(p)] for p in probe}
                finally:
                    await conn.quit()
            except ClientError as exc:
                replies = dict.fromkeys(probe, exc.reply)
        answer = {"system": name, "generation": system.generation,
                  "probe": {a: {"code": r.code, "reply": str(r)} for a, r in replies.items()}}
        refused = {a: r for a, r in replies.items() if not r.ok}
        log.info("refresh %s: generation %d%s", name, system.generation,
                 f", probe {answer['probe']}" if probe else "")
        if refused:
            why = "; ".join(f"<{a}>: {r}" for a, r in refused.items())
            return _json({**answer, "error": f"{name} refuses {why}"}, 409)
        return _json(answer)

    async def refusals(self, request: web.Request) -> web.Response:
        """Physical addresses a managed system refused with 5xx (deferred, not bounced)
        since ``?since=`` (default: the last hour), with counts and the last reply."""
        since = request.query.get("since")
        start = parse_time(since) if since else time.time() - 3600
        self.spool.write_outcomes()
        rows = self.spool.store.query(
            "SELECT physical, system, COUNT(*) AS n, MIN(at) AS first, MAX(at) AS last, "
            "MAX(id) AS id FROM deliveries WHERE result = 'refused' AND at >= ? "
            "GROUP BY physical, system ORDER BY physical", (start,))
        out = []
        for r in rows:
            detail = self.spool.store.query("SELECT detail FROM deliveries WHERE id = ?",
                                            (r["id"],))[0]["detail"]
            out.append({"physical": r["physical"], "system": r["system"], "count": r["n"],
                        "first": iso(float(r["first"])), "last": iso(float(r["last"])),
                        "reply": detail})
        return _json({"refusals": out})

    # -- up-sync, down-sync, verify --------------------------------------------------
    async def upsync(self, request: web.Request) -> web.Response:
        """Store a system's address list and merge it into the directory."""
        data = await _body(request)
        system = data.get("system")
        if not isinstance(system, str) or self.directory.system(system) is None:
            raise DirectoryError(f"'system' must name a registered system, got {system!r}")
        system = system.lower()
        raw = data.get("mailboxes")
        if not isinstance(raw, list):
            raise DirectoryError("'mailboxes' must be a list")
        mailboxes: list[tuple[str, list[str]]] = []
        for entry in raw:
            if not isinstance(entry, dict) or not isinstance(entry.get("addresses"), list):
                raise DirectoryError("each mailbox needs 'physical' and 'addresses' (a list)")
            physical = check_physical(entry.get("physical"))
            if split_physical(physical) != (system, physical.partition("@")[0]):
                raise DirectoryError(f"{physical} is not a physical address of {system}")
            addresses = [check_address(a) for a in entry["addresses"]]
            # A physical address routes to itself; listing it needs no directory entry.
            mailboxes.append((physical, [a for a in addresses if split_physical(a) is None]))
        result = self.directory.upsync(system, mailboxes)
        if result.conflicts:
            log.warning("up-sync of %s: conflicts %s", system, result.conflicts)
        self.deliverer.wake()
        return _json({"system": system, "added": result.added, "updated": result.updated,
                      "removed": result.removed, "conflicts": result.conflicts,
                      "version": self.directory.version()})

    async def downsync(self, request: web.Request) -> web.Response:
        """The merged address book every system should hold."""
        version, entries = self.directory.downsync()
        return _json({"version": version, "entries": entries})

    async def verify(self, request: web.Request) -> web.Response:
        """Does a system's latest up-sync list this physical with these addresses? (E7/E8)"""
        data = await _body(request)
        system = data.get("system")
        if not isinstance(system, str):
            raise DirectoryError("'system' must be a string")
        physical = check_physical(data.get("physical"))
        reason = self.directory.verify(system.lower(), physical, _addresses(data))
        if reason is not None:
            return _json({"ok": False, "reason": reason}, 409)
        return _json({"ok": True})

    # -- holds, release, flip ----------------------------------------------------------
    async def holds_get(self, request: web.Request) -> web.Response:
        """Every hold, with its start, its age, what it covers and the messages waiting."""
        now = time.time()
        return _json({"holds": {
            address: {"since": iso(since), "age_seconds": round(max(0.0, now - since), 3),
                      "covers": self.holds.covers(address),
                      "waiting": self.spool.waiting(address)}
            for address, since in sorted(self.holds.held.items())
        }})

    async def holds_post(self, request: web.Request) -> web.Response:
        """Hold addresses; answer once no node has a delivery for them in flight any more."""
        data = await _body(request)
        addresses = _addresses(data)
        require = data.get("require_upsync")
        if require is not None and (not isinstance(require, dict)
                                    or not isinstance(require.get("system"), str)):
            raise DirectoryError("'require_upsync' must be {\"system\": NAME[, \"physical\"]}")
        check = None if require is None else (
            str(require["system"]).lower(),
            None if require.get("physical") is None else check_physical(require["physical"]))
        try:
            since = self.holds.hold(addresses, check)
        except HoldRefused as exc:
            return _json({"error": str(exc), "missing": exc.missing}, 409)
        log.info("hold %s", ", ".join(addresses))
        if not await self.holds.wait_idle(addresses, self.hold_timeout):
            return _json({"error": f"hold recorded but {self.holds.why_busy(addresses)}; "
                                   "call again"}, 503)
        # `effective`: from this instant on, nothing for these addresses is delivered anywhere
        # (`since` is when the hold was first asked for; deliveries already in flight then
        # may have finished after it).
        return _json({"held": addresses, "since": iso(min(since.values())),
                      "effective": iso(time.time())})

    async def release(self, request: web.Request) -> web.Response:
        """Release holds and deliver what waited."""
        addresses = _addresses(await _body(request))
        released = self.holds.release(addresses)
        lasted = {a: round(s, 3) for a, s in self.holds.lasted.items()}
        log.info("release %s (held for %s s)", ", ".join(addresses), lasted)
        self.deliverer.wake()
        return _json({"released": released, "not_held": [a for a in addresses
                                                          if a not in released],
                      "held_seconds": lasted})

    async def flip(self, request: web.Request) -> web.Response:
        """Move addresses from one physical address to another, atomically (E9)."""
        data = await _body(request)
        addresses = _addresses(data)
        source, target = check_physical(data.get("from"), "from"), check_physical(data.get("to"),
                                                                                  "to")
        result = self.directory.flip(addresses, source, target)
        log.info("flip %s: %s -> %s (%s)", ", ".join(addresses), source, target, vars(result))
        self.deliverer.wake()
        return _json({**vars(result), "version": self.directory.version()})

    async def flips(self, request: web.Request) -> web.Response:
        """Several flips in one transaction, all or none (E9 of a whole wave)."""
        raw = (await _body(request)).get("flips")
        if not isinstance(raw, list) or not raw or len(raw) > MAX_FLIPS:
            raise DirectoryError(f"'flips' must be a list of 1 to {MAX_FLIPS} flips")
        flips: list[tuple[list[str], str, str]] = []
        for n, entry in enumerate(raw, 1):
            if not isinstance(entry, dict):
                raise DirectoryError(f"flip {n}: must be an object with addresses, from, to")
            flips.append((_addresses(entry), check_physical(entry.get("from"), f"flip {n}: from"),
                          check_physical(entry.get("to"), f"flip {n}: to")))
        results = self.directory.flip_many(flips)
        log.info("%d flips in one transaction: %s", len(flips), "; ".join(
            f"{', '.join(a)}: {s} -> {t}" for a, s, t in flips))
        self.deliverer.wake()
        return _json({"results": [vars(r) for r in results],
                      "version": self.directory.version()})

    # -- queue, deliveries ------------------------------------------------------------
    def _queue_counts(self) -> dict[str, int]:
        rows = self.spool.store.query(
            "SELECT r.rcpt IN (SELECT address FROM holds) AS held, COUNT(*) AS n "
            "FROM recipients r WHERE r.status = 'pending' GROUP BY 1"
        )
        counts = {bool(r["held"]): int(r["n"]) for r in rows}
        shunted = self.spool.store.query("SELECT COUNT(*) AS n FROM shunted")[0]["n"]
        return {"pending": counts.get(False, 0) + counts.get(True, 0),
                "held": counts.get(True, 0), "retrying": self.deliverer.retrying(),
                "shunted": int(shunted), "parked": self.deliverer.parked()}

    async def queue(self, request: web.Request) -> web.Response:
        """Queue counters (pending includes held and retrying recipients)."""
        return _json(self._queue_counts())

    def _queue_id(self, request: web.Request) -> str:
        queue_id = request.match_info["queue_id"]
        if not _QUEUE_ID.match(queue_id):
            raise DirectoryError(f"bad queue id {queue_id!r}")
        return queue_id.upper()

    def _not_queued(self, queue_id: str) -> web.Response:
        return _json({"error": f"{queue_id} is not in the queue"}, 404)

    async def queue_list(self, request: web.Request) -> web.Response:
        """Queued messages, oldest first (?limit=, default 1000, at most 10000)."""
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError as exc:
            raise DirectoryError("limit must be an integer") from exc
        now = time.time()
        return _json({"node": self.node, "messages": [
            {**_message_json(m, now, self.deliverer.delivering(m["queue_id"])),
             "node": self.node}
            for m in self.admin.messages(max(1, min(limit, 10000)))]})

    async def queue_show(self, request: web.Request) -> web.Response:
        """One queued message: envelope, recipients' states, header section."""
        queue_id = self._queue_id(request)
        found = self.admin.message(queue_id)
        if found is None:
            return self._not_queued(queue_id)
        headers = await asyncio.to_thread(self.admin.headers, queue_id)
        flying = self.deliverer.delivering(queue_id)  # after the await: as of the answer
        return _json({**_message_json(found, time.time(), flying), "node": self.node,
                      "headers": headers})

    async def queue_hold(self, request: web.Request) -> web.Response:
        """Admin-hold one queued message (idempotent)."""
        queue_id = self._queue_id(request)
        if not self.admin.hold(queue_id):
            return self._not_queued(queue_id)
        self.deliverer.hold_message(queue_id)  # no new attempt from this answer on
        log.info("%s put on hold by an admin", queue_id, extra={"queue_id": queue_id})
        return _json({"queue_id": queue_id, "node": self.node, "held": True})

    async def queue_release(self, request: web.Request) -> web.Response:
        """Lift an admin hold; the message is due at once."""
        queue_id = self._queue_id(request)
        if not self.admin.exists(queue_id):
            return self._not_queued(queue_id)
        released = self.admin.release(queue_id)
        log.info("%s released by an admin", queue_id, extra={"queue_id": queue_id})
        self.deliverer.wake()
        return _json({"queue_id": queue_id, "node": self.node, "released": released})

    async def queue_delete(self, request: web.Request) -> web.Response:
        """Delete one queued message (logged in the delivery log as 'deleted')."""
        queue_id = self._queue_id(request)
        dropped = self.admin.delete(queue_id)
        if dropped is None:
            return self._not_queued(queue_id)
        self.deliverer.drop({queue_id})
        log.warning("%s deleted by an admin (%d pending recipients dropped)", queue_id,
                    dropped, extra={"queue_id": queue_id})
        return _json({"queue_id": queue_id, "node": self.node, "deleted": True,
                      "recipients_dropped": dropped})

    async def queue_flush(self, request: web.Request) -> web.Response:
        """Retry every pending recipient now (held ones stay held)."""
        due = self.admin.flush()
        log.info("queue flushed by an admin: %d recipients made due", due)
        self.deliverer.wake()
        return _json({"node": self.node, "flushed": due})

    async def quarantine_list(self, request: web.Request) -> web.Response:
        """Messages set aside in spool/quarantine, with the reason, oldest first."""
        found = await asyncio.to_thread(self.spool.quarantined)
        for info in found:
            if isinstance(info.get("at"), int | float):
                info["at"] = iso(float(str(info["at"])))
            info["node"] = self.node
        return _json({"node": self.node, "messages": found})

    async def quarantine_requeue(self, request: web.Request) -> web.Response:
        """Put a quarantined message back into the queue (it must pass its checks)."""
        queue_id = self._queue_id(request)
        if not (self.spool.quarantine_dir / f"{queue_id}.eml").exists():
            return _json({"error": f"{queue_id} is not in quarantine"}, 404)
        try:
            queued = await self.spool.requeue(queue_id)
        except QuarantineError as exc:
            return _json({"error": str(exc)}, 409)
        return _json({"queue_id": queue_id, "node": self.node, "requeued": True,
                      "recipients": queued})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition."""
        return web.Response(body=metrics.exposition(),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def deliveries(self, request: web.Request) -> web.Response:
        """Delivery log rows, oldest first (?rcpt=, ?since=, ?limit=)."""
        rcpt = request.query.get("rcpt")
        since = request.query.get("since")
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError as exc:
            raise DirectoryError("limit must be an integer") from exc
        rows = self.deliverer.log_rows(
            check_address(rcpt) if rcpt else None,
            parse_time(since) if since else None, max(1, min(limit, 10000)),
        )
        for row in rows:
            row["at"] = iso(float(str(row["at"])))
        return _json({"deliveries": rows})


def _message_json(message: dict[str, Any], now: float, flying: set[str]) -> dict[str, Any]:
    """A queue message for the API: ISO times and ages; `in_flight` (the message's and each
    recipient's): a delivery attempt of it is running now (`flying`: those recipients), as
    opposed to waiting for its next try, parked or held."""
    received = float(message["received_at"])
    hold = message["admin_hold"]
    return {
        "queue_id": message["queue_id"], "from": message["mail_from"],
        "received_at": iso(received), "age_seconds": round(max(0.0, now - received), 3),
        "size": message["size"], "message_id": message["message_id"],
        "admin_hold": None if hold is None else iso(float(hold)),
        "in_flight": bool(flying),
        "recipients": [
            {**r, "next_try": iso(r["next_try"]) if r["next_try"] else None,
             "in_flight": r["rcpt"] in flying}
            for r in message["recipients"]
        ],
    }
