"""Client of fed's control API: how the reconciler reads and drives the routing hub.

fed is a separate server (DESIGN.md, rule 2), so the reconciler reaches it only over HTTP,
through the shared client (``mailferry.mail.http``, on aiohttp: a pool of kept-alive
connections, a timeout per route). Each route of ``docs/fed-api.md`` is one method returning
a typed value, with its own time to wait for the answer (`ROUTE_TIMEOUTS`).

Errors follow the reconciler's hierarchy (``reconciler.errors``), because the engine turns
them into back-off or a frozen migration:

- cannot connect, no answer yet, connection broken, or 5xx -> ``TemporaryError`` naming
  the URL and which of these it was: the step is retried later, the migration keeps its
  state;
- 401 -> ``PermanentError``: a wrong token will not fix itself;
- 409 with ``"fenced": true`` -> ``LeaseLost``: another reconciler holds a newer lease;
- verify's 409 is an *answer* (E8 negative), returned as ``VerifyResult(ok=False)``;
- flip's 409 (an address at a third physical) -> ``PermanentError`` with fed's reason: the
  patent stops the migration there and an admin must look;
- any other 4xx -> ``PermanentError`` (the request itself is wrong).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from mailferry.mail.http import BadHeader, HttpClient, HttpError, NoAnswerYet
from reconciler.errors import LeaseLost, PermanentError, TemporaryError


@dataclass(frozen=True)
class SystemInfo:
    """A system registered in fed."""

    name: str
    host: str
    port: int
    protocol: str
    generation: int = 0  # bumped by every refresh
    tls: str = "none"  # "starttls" or "implicit": fed requires it, verifies the certificate
    cafile: str | None = None
    auth_user: str | None = None  # SMTP AUTH as this user (password in auth_file)
    auth_file: str | None = None
    rcpt: str = ""  # RCPT TO format for its physical addresses ("": the physical itself)


@dataclass(frozen=True)
class DirectoryEntry:
    """One directory entry."""

    address: str
    physical: str


@dataclass(frozen=True)
class AddressBook:
    """The directory (or the down-sync): version and address -> physical."""

    version: int
    entries: dict[str, str]


@dataclass(frozen=True)
class UpsyncResult:
    """What an up-sync changed."""

    added: dict[str, str]
    updated: dict[str, str]
    removed: list[str]
    conflicts: list[dict[str, str]]
    version: int


@dataclass(frozen=True)
class VerifyResult:
    """E7/E8: does fed see the address list of the target mailbox?"""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class HoldInfo:
    """One held address."""

    since: str
    waiting: int
    age_seconds: float = 0.0
    covers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HoldResult:
    """Answer of a hold: these addresses are held and nothing for them is in flight."""

    held: list[str]
    since: str
    effective: str  # from this instant nothing for them is delivered anywhere


@dataclass(frozen=True)
class ReleaseResult:
    """Answer of a release."""

    released: list[str]
    not_held: list[str]
    held_seconds: dict[str, float] = field(default_factory=dict)  # how long each hold lasted


@dataclass(frozen=True)
class FlipResult:
    """Answer of a flip."""

    flipped: list[str]
    already: list[str]
    created: list[str]
    version: int


@dataclass(frozen=True)
class QueueCounts:
    """Queue counters (pending includes held and retrying recipients)."""

    pending: int
    held: int
    retrying: int
    shunted: int
    parked: int = 0  # recipients fed decided not to deliver for now (held, fenced)


@dataclass(frozen=True)
class Delivery:
    """One row of fed's delivery log."""

    at: str
    queue_id: str
    rcpt: str
    physical: str | None
    system: str | None
    message_id: str | None
    result: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """A managed system answered 5xx for a physical address fed routes there (deferred)."""

    physical: str
    system: str
    count: int
    first: str
    last: str
    reply: str


def _q(address: str) -> str:
    return urllib.parse.quote(address, safe="@")


FENCE_HEADER = "Mailferry-Fence"  # fed/control.py reads it (docs/fed-api.md, fencing)
DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# Seconds to wait for fed's answer, by route, where 10 s is not enough by design: a hold
# answers once no delivery for the addresses is in flight on any node, which fed waits for up
# to its --hold-timeout (120 s by default); the directory, up-sync and down-sync carry every
# mailbox (100,000 of them are a few MB). Keep fed's --hold-timeout below the hold's.
ROUTE_TIMEOUTS: dict[tuple[str, str], float] = {
    ("POST", "/v1/holds"): 150.0,
    ("POST", "/v1/upsync"): 120.0,
    ("GET", "/v1/directory"): 60.0,
    ("GET", "/v1/downsync"): 60.0,
    ("POST", "/v1/flip"): 30.0,
    ("POST", "/v1/flips"): 60.0,  # a whole wave (up to 10,000 flips) in one transaction
}


class FedClient:
    """One method per route of fed's control API, over kept-alive connections (one per call
    in flight, reused by the next).

    Transport errors say which of three things happened, because an admin acts differently:
    *cannot connect* (fed is down or the URL is wrong), *no answer yet* (fed took the
    request and is still working on it -- a hold waiting for deliveries in flight -- so the
    step is retried later, not reported as an outage), *the connection broke* (fed died or
    restarted mid-request). A kept-alive connection fed closed while idle is re-opened once
    and the request sent again: every route of fed's API is idempotent (docs/fed-api.md)."""

    def __init__(self, base_url: str, token: str, timeout: float = DEFAULT_TIMEOUT, *,
                 timeouts: dict[tuple[str, str], float] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout  # routes without an entry in `timeouts`
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PermanentError(f"fed control URL {base_url!r}: expected http(s)://HOST:PORT")
        self.http = HttpClient(self.base_url, name="fed", timeout=timeout,
                               timeouts={**ROUTE_TIMEOUTS, **(timeouts or {})},
                               connect_timeout=connect_timeout, retry_idle="all")
        # (lease id, generation) of the reconciler using this client: sent with every
        # mutating call so that fed refuses it once a newer holder has called (LeaseLost).
        self.fence: tuple[str, int] | None = None

    # -- transport ------------------------------------------------------------------
    def timeout_for(self, method: str, path: str) -> float:
        """Seconds to wait for fed's answer to `method path` (its query string ignored)."""
        return self.http.timeout_for(method, path)

    def close(self) -> None:
        """Close the connections and the client's loop thread (the next call opens new ones)."""
        self.http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              ok: tuple[int, ...] = ()) -> tuple[int, Any]:
        """(status, decoded JSON); statuses in `ok` are returned instead of raised."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        if self.fence is not None and method not in ("GET", "HEAD"):
            headers[FENCE_HEADER] = f"{self.fence[0]}/{self.fence[1]}"
        try:
            answer = self.http.request(method, path, data, headers=headers)
        except BadHeader:
            raise PermanentError(f"cannot send {method} {url}: the fed token is not a "
                                 "valid HTTP header value") from None
        except NoAnswerYet as exc:
            raise TemporaryError(f"{exc} (fed may still be working on it; the step is tried "
                                 "again)", delay=5.0) from exc
        except HttpError as exc:  # cannot connect, or closed mid-request: its own words
            raise TemporaryError(str(exc)) from exc
        return self._answer(method, url, answer.status, answer.reason, answer.body, ok)

    def _answer(self, method: str, url: str, status: int, phrase: str, raw: bytes,
                ok: tuple[int, ...]) -> tuple[int, Any]:
        """The decoded answer, or the error `status` means (module docstring)."""
        if 200 <= status < 300:
            return status, _decode(raw, url)
        payload = _decode(raw, url, strict=False)
        reason = payload.get("error") if isinstance(payload, dict) else None
        reason = reason or (payload.get("reason") if isinstance(payload, dict) else None)
        reason = reason or phrase
        # Fenced before a route's own 409 (refresh, verify, flip): that answer would read a
        # lost lease as the route's refusal and retry it.
        if status == 409 and isinstance(payload, dict) and payload.get("fenced") is True:
            raise LeaseLost(f"fed refused {method} {url}: {reason}")
        if status in ok:
            return status, payload
        if status == 401:
            raise PermanentError(f"fed refused the token at {method} {url}: {reason}")
        if status >= 500:
            raise TemporaryError(f"fed failed {method} {url}: {status} {reason}")
        raise PermanentError(f"fed rejected {method} {url}: {status} {reason}")

    def _get(self, path: str) -> Any:
        return self._call("GET", path)[1]

    # -- routes ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """GET /v1/health."""
        result: dict[str, Any] = self._get("/v1/health")
        return result

    def wait_ready(self, timeout: float) -> None:
        """Poll /v1/health until fed answers; TemporaryError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.health()
                return
            except TemporaryError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def directory(self) -> AddressBook:
        """GET /v1/directory."""
        data = self._get("/v1/directory")
        return AddressBook(int(data["version"]), dict(data["entries"]))

    def lookup(self, address: str) -> str | None:
        """GET /v1/directory/{address}: its physical address, or None."""
        status, data = self._call("GET", f"/v1/directory/{_q(address)}", ok=(404,))
        return None if status == 404 else str(data["physical"])

    def put_entry(self, address: str, physical: str) -> DirectoryEntry:
        """PUT /v1/directory/{address}."""
        data = self._call("PUT", f"/v1/directory/{_q(address)}", {"physical": physical})[1]
        return DirectoryEntry(data["address"], data["physical"])

    def delete_entry(self, address: str) -> bool:
        """DELETE /v1/directory/{address}; True if it existed."""
        return bool(self._call("DELETE", f"/v1/directory/{_q(address)}")[1]["deleted"])

    def systems(self) -> list[SystemInfo]:
        """GET /v1/systems."""
        return [SystemInfo(**s) for s in self._get("/v1/systems")["systems"]]

    def put_system(self, name: str, host: str, port: int, protocol: str = "lmtp", *,
                   tls: str = "none", cafile: str | None = None, auth_user: str | None = None,
                   auth_file: str | None = None, rcpt: str = "") -> SystemInfo:
        """PUT /v1/systems/{name}."""
        body: dict[str, object] = {"host": host, "port": port, "protocol": protocol,
                                   "tls": tls, "cafile": cafile}
        if auth_user is not None or rcpt:  # (older feds ignore what they do not know)
            body.update(auth_user=auth_user, auth_file=auth_file, rcpt=rcpt)
        return SystemInfo(**self._call("PUT", f"/v1/systems/{_q(name)}", body)[1])

    def refresh_system(self, name: str, probe: list[str] | None = None) -> dict[str, str]:
        """POST /v1/systems/{name}/refresh: fed retires its pooled connections to the system
        (its tables changed) and, for `probe`, asks it on a fresh session whether it takes
        these physical addresses. Returns address -> reply; a refusal is a TemporaryError
        with the system's reply (the step waits and retries)."""
        status, data = self._call("POST", f"/v1/systems/{_q(name)}/refresh",
                                  {"probe": list(probe or [])}, ok=(409,))
        replies = {str(a): str(r["reply"]) for a, r in data.get("probe", {}).items()}
        if status == 409:
            raise TemporaryError(f"fed's fresh session to {name}: {data.get('error')}",
                                 delay=2.0)
        return replies

    def refusals(self, since: str | None = None) -> list[Refusal]:
        """GET /v1/refusals: physical addresses a managed system refused (deferred)."""
        query = "?" + urllib.parse.urlencode({"since": since}) if since else ""
        return [Refusal(str(r["physical"]), str(r["system"]), int(r["count"]),
                        str(r["first"]), str(r["last"]), str(r["reply"]))
                for r in self._get("/v1/refusals" + query)["refusals"]]

    def upsync(self, system: str, mailboxes: dict[str, list[str]]) -> UpsyncResult:
        """POST /v1/upsync with `physical -> addresses` of every mailbox of `system`."""
        body = {"system": system, "mailboxes": [
            {"physical": physical, "addresses": addresses}
            for physical, addresses in mailboxes.items()
        ]}
        data = self._call("POST", "/v1/upsync", body)[1]
        return UpsyncResult(dict(data["added"]), dict(data["updated"]), list(data["removed"]),
                            list(data["conflicts"]), int(data["version"]))

    def downsync(self) -> AddressBook:
        """GET /v1/downsync: the merged address book for every system."""
        data = self._get("/v1/downsync")
        return AddressBook(int(data["version"]), dict(data["entries"]))

    def verify(self, system: str, physical: str, addresses: list[str]) -> VerifyResult:
        """POST /v1/verify (E7/E8); a negative answer is a result, not an exception."""
        body = {"system": system, "physical": physical, "addresses": addresses}
        status, data = self._call("POST", "/v1/verify", body, ok=(409,))
        return VerifyResult(bool(data.get("ok")) and status == 200, str(data.get("reason", "")))

    def hold(self, addresses: list[str], require_upsync: dict[str, str] | None = None
             ) -> HoldResult:
        """POST /v1/holds: returns once nothing is in flight for these addresses on any fed
        node. `require_upsync` ({"system"[, "physical"]}): fed refuses (409, PermanentError)
        unless that system's latest up-sync lists every address the hold covers (E8)."""
        body: dict[str, Any] = {"addresses": addresses}
        if require_upsync is not None:
            body["require_upsync"] = require_upsync
        data = self._call("POST", "/v1/holds", body)[1]
        return HoldResult(list(data["held"]), str(data["since"]),
                          str(data.get("effective", data["since"])))

    def holds(self) -> dict[str, HoldInfo]:
        """GET /v1/holds: held address -> since and messages waiting."""
        return {a: HoldInfo(str(h["since"]), int(h["waiting"]), float(h.get("age_seconds", 0.0)),
                            tuple(h.get("covers", ())))
                for a, h in self._get("/v1/holds")["holds"].items()}

    def release(self, addresses: list[str]) -> ReleaseResult:
        """POST /v1/release."""
        data = self._call("POST", "/v1/release", {"addresses": addresses})[1]
        return ReleaseResult(list(data["released"]), list(data["not_held"]),
                             {str(a): float(s) for a, s in data.get("held_seconds", {}).items()})

    def flip(self, addresses: list[str], source: str, target: str) -> FlipResult:
        """POST /v1/flip (E9); PermanentError with fed's reason on 409."""
        body = {"addresses": addresses, "from": source, "to": target}
        data = self._call("POST", "/v1/flip", body)[1]
        return FlipResult(list(data["flipped"]), list(data["already"]), list(data["created"]),
                          int(data["version"]))

    def flip_many(self, flips: list[tuple[list[str], str, str]]) -> list[FlipResult]:
        """POST /v1/flips: several (addresses, from, to) flips in one transaction, all or
        none (a wave's E9 in one call); PermanentError with fed's reason on 409."""
        body = {"flips": [{"addresses": a, "from": s, "to": t} for a, s, t in flips]}
        data = self._call("POST", "/v1/flips", body)[1]
        version = int(data["version"])
        return [FlipResult(list(r["flipped"]), list(r["already"]), list(r["created"]), version)
                for r in data["results"]]

    def queue(self) -> QueueCounts:
        """GET /v1/queue."""
        return QueueCounts(**self._get("/v1/queue"))

    def queue_messages(self, limit: int = 1000) -> list[dict[str, Any]]:
        """GET /v1/queue/messages: this node's queued messages (with each recipient's
        status and destination), oldest first."""
        rows: list[dict[str, Any]] = self._get(f"/v1/queue/messages?limit={limit}")["messages"]
        return rows

    def nodes(self) -> list[dict[str, Any]]:
        """GET /v1/nodes: every fed node with `alive` and `heartbeat_age`."""
        rows: list[dict[str, Any]] = self._get("/v1/nodes")["nodes"]
        return rows

    def deliveries(self, rcpt: str | None = None, since: str | None = None,
                   limit: int = 1000) -> list[Delivery]:
        """GET /v1/deliveries: delivery log rows, oldest first."""
        query: dict[str, str] = {"limit": str(limit)}
        if rcpt:
            query["rcpt"] = rcpt
        if since:
            query["since"] = since
        rows = self._get("/v1/deliveries?" + urllib.parse.urlencode(query))["deliveries"]
        known = {"at", "queue_id", "rcpt", "physical", "system", "message_id", "result",
                 "detail"}
        return [Delivery(**{k: r.get(k) for k in known},
                         extra={k: v for k, v in r.items() if k not in known}) for r in rows]


def _decode(raw: bytes, url: str, strict: bool = True) -> Any:
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if not strict:
            return None
        raise TemporaryError(f"fed answered {url} with something that is not JSON") from exc
