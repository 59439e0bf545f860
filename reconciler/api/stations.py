"""The station API: the only door between a user's workstation and the reconciler.

Why this exists. The patent's user station US1 takes part in a migration three times: it runs
the pre-migration verifications (E20, and again shortly before the window, E22), it reports the
type and size of the mailbox (E23), and after the cutover it moves the user's local mail into
the new mailbox, switches the mail client's parameterization, tests it, rolls back on failure
and finally removes the old parameterization (E30-E33). The migration control server "triggers"
these steps; in mailferry the engine writes what a station must do next in
`Migration.station_action`, and this API serves that to the station agent and stores what the
agent reports in `station_reports`, where the engine reads it to advance the state machine.

Why it looks like this.

- **Pull, not push.** Workstations sit behind NAT and firewalls and are switched off at night,
  so the agent polls `GET .../task`; the reconciler never connects to a workstation.
- **One token per station, hashed at rest.** `enrol_station` hands out a random token once;
  only its SHA-256 is stored, so a leaked state store does not leak credentials. The token
  alone identifies the station: a route under `/v1/stations/{name}/` is refused (403) unless
  `{name}` is the token's own station, and a report's `migration_id` must be a migration of the
  station's own address. That is DESIGN.md invariant 8: a station acts on its own mailbox only.
- **Idempotent writes.** The agent keeps every report in an outbox until the API acknowledged
  it and resends after a crash or a network cut, so a report is keyed by the agent-chosen
  `report_id` (unique column): a resend answers 200 and stores nothing new. A message upload is
  keyed by the SHA-256 of its bytes within the target folder, checked against the real mailbox
  (`list_messages`) before appending: re-uploading never duplicates (invariant 3).
- **Uploads only while the engine says so.** The messages route writes into the *target*
  mailbox of the station's migration, and only while that migration's action is
  `local-migrate` (E30 happens after the cutover E9, never before): otherwise 409.
- **Blocking work off the event loop.** The state store (SQLAlchemy, sync) and the drivers
  (sync, may talk to a remote server) run in worker threads so one slow upload does not stall
  every other station's poll.

The OpenAPI 3.1 description served at `/v1/openapi.json` is `OPENAPI` below; the prose
version is `docs/station-api.md`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from reconciler.drivers.base import MailSystemDriver, content_sha256
from reconciler.errors import PermanentError, TemporaryError
from reconciler.state.model import Migration, Station, StationReport, utcnow
from reconciler.state.store import Store

REPORT_KINDS = frozenset(
    {"check1", "check2", "local-data", "switch", "test", "rollback", "cleanup", "done", "failed"}
)
# A 40 MB message is about 54 MB once base64-encoded in JSON; larger ones are refused (413).
MAX_BODY_BYTES = 60 * 1024 * 1024
# Every other body is small: a report is a few hundred bytes (a local-data report lists the
# folders). Its detail is stored as is in the state store, so it is bounded on its own, and a
# report body is refused (413) before it is read whole, not after 60 MB.
MAX_REPORT_BYTES = 1024 * 1024
MAX_DETAIL_BYTES = 256 * 1024
MAX_FOLDER_CHARS = 512
MAX_ID = 2**63 - 1  # a SQL BIGINT
MAX_DATE = 253402300799  # 9999-12-31T23:59:59Z, the last instant every platform's time_t takes
# What the OpenAPI description promises, the validators below enforce (the fuzz test checks).
_FOLDER_PART = r"(?!\.\.?(?:/|$))[^/\x00-\x1f]+"
FOLDER_PATTERN = rf"^{_FOLDER_PART}(?:/{_FOLDER_PART})*$"
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"
MAILDIR_FLAGS = frozenset("DFPRST")
log = logging.getLogger("reconciler.api")
_REPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DriverFor = Callable[[str], MailSystemDriver]
TargetInfo = Callable[[str], dict[str, object]]

STORE_KEY = web.AppKey("store", Store)
DRIVER_FOR_KEY: web.AppKey[DriverFor] = web.AppKey("driver_for")
TARGET_INFO_KEY: web.AppKey[TargetInfo] = web.AppKey("target_info")
LOCKS_KEY = web.AppKey("folder_locks", dict[tuple[str, str, str], asyncio.Lock])


def token_hash(token: str) -> str:
    """The stored form of a station token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class AddressTaken(ValueError):
    """The address is enrolled for another station (invariant 8: one station acts for it)."""


def enrol_station(store: Store, name: str, address: str, *, move: bool = False) -> str:
    """Enrol (or re-enrol) station `name` for `address`; return its new token, shown once.

    An address another station is enrolled for is refused (AddressTaken): two workstations
    uploading local mail into one mailbox, or the wrong desk's agent switching a mail
    client, is exactly the mistake a help desk makes with a typo. `move=True` moves the
    address: the other station is unenrolled (its token stops working at once)."""
    if not name or len(name) > 128 or "/" in name:
        raise ValueError(f"invalid station name {name!r}")
    if "@" not in address:
        raise ValueError(f"invalid address {address!r}")
    token = secrets.token_urlsafe(32)
    with store.session() as session:
        others = session.scalars(select(Station).where(
            func.lower(Station.address) == address.lower(), Station.name != name)).all()
        if others and not move:
            names = ", ".join(sorted(o.name for o in others))
            raise AddressTaken(f"{address} is already enrolled for station {names}; to move "
                               f"it to {name}, enrol again with --move (that station's token "
                               "stops working)")
        for other in others:
            session.delete(other)
        row = session.get(Station, name)
        if row is None:
            session.add(Station(name=name, address=address, token_sha256=token_hash(token)))
        else:
            # Re-enrolment replaces the token: the old one stops working at once.
            row.address = address
            row.token_sha256 = token_hash(token)
    return token


# -- errors ------------------------------------------------------------------------------


def _fail(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    """An HTTP error whose body is `{"error": message}`."""
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def _too_large(message: str, limit: int, size: int) -> web.HTTPException:
    """A 413 whose body is `{"error": message}` (aiohttp's class wants both sizes)."""
    return web.HTTPRequestEntityTooLarge(limit, size, text=json.dumps({"error": message}),
                                         content_type="application/json")


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give aiohttp's own errors (404, 405, 413) the same JSON shape as ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        # Answer rather than re-raise: some of these classes need extra constructor arguments.
        # Keep the headers that carry meaning (405's Allow is required by RFC 9110).
        kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=kept)
    except Exception as exc:
        # A bug or an unexpected driver error: a 500 the agent retries later, and a log line
        # with the traceback for the operator (never a silent success).
        log.exception("station API: %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                 status=500)


# -- helpers -----------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def _current_migration(session: Session, address: str) -> Migration | None:
    """The newest non-purged migration of `address` (addresses compare case-insensitively)."""
    query = (
        select(Migration)
        .where(func.lower(Migration.address) == address.lower(), Migration.purged.is_(False))
        .order_by(Migration.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def _authenticate(store: Store, name: str, header: str) -> tuple[str, str]:
    """(station name, address) of the bearer token, checked against `name`; updates last_seen."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _fail(web.HTTPUnauthorized, "missing bearer token")
    digest = token_hash(token)
    with store.session() as session:
        station = session.scalars(select(Station).where(Station.token_sha256 == digest)).first()
        if station is None:
            raise _fail(web.HTTPUnauthorized, "unknown token")
        if station.name != name:
            # Invariant 8: the token's station is the only one it may speak for.
            raise _fail(web.HTTPForbidden, f"this token belongs to station {station.name!r}, "
                        f"not {name!r}")
        station.last_seen = utcnow()
        return station.name, station.address


async def _station(request: web.Request) -> tuple[str, str]:
    store = request.app[STORE_KEY]
    header = request.headers.get("Authorization", "")
    return await asyncio.to_thread(_authenticate, store, request.match_info["name"], header)


async def _json_object(request: web.Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object; 413 as soon as it is longer than `limit` bytes (by its
    Content-Length, or while reading a chunked one), never after reading it whole."""
    too_large = f"request body larger than {limit:,} bytes"
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(too_large, limit, request.content_length)
    raw = bytearray()
    while chunk := await request.content.read(64 * 1024):
        raw += chunk
        if len(raw) > limit:
            raise _too_large(too_large, limit, len(raw))
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _fail(web.HTTPBadRequest, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _fail(web.HTTPBadRequest, "body must be a JSON object")
    return body


# -- routes ------------------------------------------------------------------------------


async def get_task(request: web.Request) -> web.Response:
    """What the station must do now for the newest migration of its address."""
    name, address = await _station(request)
    store = request.app[STORE_KEY]

    def load() -> dict[str, Any] | None:
        with store.session() as session:
            m = _current_migration(session, address)
            if m is None:
                return None
            return {
                "id": m.id, "state": m.state, "failed": m.failed,
                "target_system": m.target_system, "target_mailbox": m.target_mailbox,
                "action": m.station_action, "action_since": _iso(m.station_action_since),
            }

    migration = await asyncio.to_thread(load)
    if migration is not None:
        try:
            migration["target"] = request.app[TARGET_INFO_KEY](migration["target_system"])
        except Exception as exc:  # the caller's lookup failed: the station should retry later
            raise _fail(web.HTTPServiceUnavailable, f"target information unavailable: {exc}") \
                from None
    return web.json_response({"station": name, "address": address, "migration": migration})


def _validate_report(body: dict[str, Any]) -> tuple[str, int | None, str, bool, dict[str, Any]]:
    report_id = body.get("report_id")
    if not isinstance(report_id, str) or not _REPORT_ID.fullmatch(report_id):
        raise _fail(web.HTTPBadRequest, "report_id must be a string of 1-64 characters "
                    "[A-Za-z0-9._-] (a UUID)")
    migration_id = body.get("migration_id")
    if isinstance(migration_id, float) and migration_id.is_integer():
        migration_id = int(migration_id)  # 69.0 is an integer for JSON Schema, so for us
    if migration_id is not None and (isinstance(migration_id, bool)
                                     or not isinstance(migration_id, int)
                                     or not 0 <= migration_id <= MAX_ID):
        # The range check keeps a huge integer from overflowing the database driver (500).
        raise _fail(web.HTTPBadRequest, "migration_id must be an integer or null")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in REPORT_KINDS:  # {} is unhashable: a 500
        raise _fail(web.HTTPBadRequest, f"kind must be one of {sorted(REPORT_KINDS)}")
    ok = body.get("ok")
    if not isinstance(ok, bool):
        raise _fail(web.HTTPBadRequest, "ok must be true or false")
    detail = body.get("detail", {})
    if not isinstance(detail, dict):
        raise _fail(web.HTTPBadRequest, "detail must be a JSON object")
    size = len(json.dumps(detail, ensure_ascii=False).encode("utf-8"))
    if size > MAX_DETAIL_BYTES:
        raise _too_large(f"detail is {size:,} bytes as JSON; at most {MAX_DETAIL_BYTES:,}",
                         MAX_DETAIL_BYTES, size)
    return report_id, migration_id, str(kind), ok, detail


async def post_report(request: web.Request) -> web.Response:
    """Store one report; a resend of a stored report_id answers 200 and stores nothing."""
    name, address = await _station(request)
    body = await _json_object(request, MAX_REPORT_BYTES)
    report_id, migration_id, kind, ok, detail = _validate_report(body)
    store = request.app[STORE_KEY]

    def save() -> tuple[int, dict[str, Any]]:
        with store.session() as session:
            existing = session.scalars(
                select(StationReport).where(StationReport.report_id == report_id)).first()
            if existing is not None:
                if existing.station != name:
                    raise _fail(web.HTTPConflict, "report_id already used by another station")
                return 200, {"id": existing.id, "stored": False}
            if migration_id is not None:
                m = session.get(Migration, migration_id)
                if m is None or m.address.lower() != address.lower():
                    raise _fail(web.HTTPForbidden,
                                f"migration {migration_id} is not a migration of {address}")
            row = StationReport(station=name, address=address, migration_id=migration_id,
                                kind=kind, ok=ok, detail=detail, report_id=report_id,
                                at=utcnow())
            session.add(row)
            session.flush()
            return 201, {"id": row.id, "stored": True}

    try:
        status, body = await asyncio.to_thread(save)
    except IntegrityError:
        # Two resends raced past the lookup; the unique report_id kept exactly one.
        status, body = 200, {"stored": False}
    return web.json_response(body, status=status)


def _validate_message(body: dict[str, Any]) -> tuple[str, str, float | None, bytes]:
    folder = body.get("folder")
    if (not isinstance(folder, str) or not folder or len(folder) > MAX_FOLDER_CHARS
            or folder.startswith("/") or folder.endswith("/")
            or any(part in ("", ".", "..") for part in folder.split("/"))
            or any(ord(ch) < 32 for ch in folder)):
        raise _fail(web.HTTPBadRequest, "folder must be a '/'-separated path without empty, "
                    "'.' or '..' parts")
    flags = body.get("flags", "")
    if not isinstance(flags, str) or not set(flags) <= MAILDIR_FLAGS:
        raise _fail(web.HTTPBadRequest, "flags must be Maildir flag letters among DFPRST")
    internal_date = body.get("internal_date")
    if internal_date is not None and (isinstance(internal_date, bool)
                                      or not isinstance(internal_date, int | float)
                                      or not 0 <= internal_date <= MAX_DATE):
        # The bounds keep NaN, infinities and year 10000+ from crashing the storage (500).
        raise _fail(web.HTTPBadRequest, "internal_date must be seconds since the epoch or null")
    raw = body.get("data")
    if not isinstance(raw, str):
        raise _fail(web.HTTPBadRequest, "data must be the message, base64-encoded")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise _fail(web.HTTPBadRequest, "data is not valid base64") from None
    if not data:
        raise _fail(web.HTTPBadRequest, "data is empty")
    return folder, "".join(sorted(set(flags))), (
        None if internal_date is None else float(internal_date)), data


async def post_message(request: web.Request) -> web.Response:
    """Append one local message to the station's target mailbox (E30), once."""
    _name, address = await _station(request)
    folder, flags, internal_date, data = _validate_message(await _json_object(request))
    store = request.app[STORE_KEY]

    def target() -> tuple[str, str]:
        with store.session() as session:
            m = _current_migration(session, address)
            if m is None:
                raise _fail(web.HTTPConflict, f"no migration for {address}")
            if m.failed or m.station_action != "local-migrate":
                raise _fail(web.HTTPConflict, f"migration {m.id} does not expect local data now "
                            f"(action: {m.station_action}, failed: {m.failed})")
            return m.target_system, m.target_mailbox

    system, mailbox = await asyncio.to_thread(target)
    digest = content_sha256(data)  # what drivers list: CRLF read as LF
    driver = request.app[DRIVER_FOR_KEY](system)

    def append() -> tuple[int, dict[str, Any]]:
        # Check the real mailbox, not a cache: the check is what makes a resend harmless.
        # Ask for the folder's messages directly rather than looking the name up in
        # list_folders: a storage may spell names differently (Maildir++ reads "v1.2" back
        # as "v1/2"), and a missed match here would append a duplicate on every resend.
        try:
            present = driver.list_messages(mailbox, folder)
        except PermanentError:
            present = []  # no such folder yet
        if any(msg.sha256 == digest for msg in present):
            return 200, {"present": True, "sha256": digest}
        key = driver.append_message(mailbox, folder, data, flags=flags,
                                    internal_date=internal_date)
        return 201, {"present": False, "sha256": digest, "key": key}

    # Serialise uploads per folder so two concurrent resends cannot both miss the check.
    locks = request.app[LOCKS_KEY]
    lock = locks.setdefault((system, mailbox, folder), asyncio.Lock())
    try:
        async with lock:
            status, body = await asyncio.to_thread(append)
    except TemporaryError as exc:
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENAMETOOLONG:
            # The folder name is too long for the target's storage: resending cannot help,
            # so this is a refusal (409), not an outage (503) the agent would retry forever.
            raise _fail(web.HTTPConflict, f"target system {system} cannot store a folder "
                        f"named {folder!r}: name too long") from None
        raise _fail(web.HTTPServiceUnavailable, f"target system {system}: {exc}") from None
    except PermanentError as exc:
        # E.g. the target mailbox does not exist (yet): resending will not help until an
        # admin or the engine fixes the target.
        raise _fail(web.HTTPConflict, f"target system {system}: {exc}") from None
    return web.json_response(body, status=status)


async def get_openapi(_request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API (no token needed)."""
    return web.json_response(OPENAPI)


def make_app(store: Store, driver_for: DriverFor, target_info: TargetInfo) -> web.Application:
    """The station API as an aiohttp application."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
    app[STORE_KEY] = store
    app[DRIVER_FOR_KEY] = driver_for
    app[TARGET_INFO_KEY] = target_info
    app[LOCKS_KEY] = {}
    app.router.add_get("/v1/openapi.json", get_openapi)
    app.router.add_get("/v1/stations/{name}/task", get_task)
    app.router.add_post("/v1/stations/{name}/reports", post_report)
    app.router.add_post("/v1/stations/{name}/messages", post_message)
    return app


# -- OpenAPI -------------------------------------------------------------------------------

_ERROR = {"$ref": "#/components/responses/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "The station's name; must be the station the token was issued to."}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "mailferry station API",
        "version": "1",
        "description": "What station agents poll (their task) and send (reports, local mail). "
                       "Every station route needs `Authorization: Bearer <token>`; a token "
                       "may only use routes of its own station (else 403).",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/openapi.json": {
            "get": {"summary": "This document.", "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                          "content": {"application/json": {}}}}},
        },
        "/v1/stations/{name}/task": {
            "get": {
                "summary": "What the station must do now (newest non-purged migration).",
                "parameters": [_NAME],
                "responses": {
                    "200": {"description": "The task.", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Task"}}}},
                    "401": _ERROR, "403": _ERROR, "503": _ERROR,
                },
            },
        },
        "/v1/stations/{name}/reports": {
            "post": {
                "summary": "Store a station report; idempotent by report_id.",
                "parameters": [_NAME],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Report"}}}},
                "responses": {
                    "201": {"description": "Stored.", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ReportAck"}}}},
                    "200": {"description": "That report_id was already stored; nothing new.",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/ReportAck"}}}},
                    "400": _ERROR, "401": _ERROR, "403": _ERROR, "409": _ERROR,
                    "413": {"description": "The body is larger than 1 MiB, or the detail "
                                           "larger than 256 KiB as JSON.",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Error"}}}},
                },
            },
        },
        "/v1/stations/{name}/messages": {
            "post": {
                "summary": "Append a local message to the station's target mailbox (E30); "
                           "only while the action is local-migrate; idempotent by SHA-256 "
                           "within the folder.",
                "parameters": [_NAME],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Message"}}}},
                "responses": {
                    "201": {"description": "Appended.", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/MessageAck"}}}},
                    "200": {"description": "Already present; nothing appended.",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/MessageAck"}}}},
                    "400": _ERROR, "401": _ERROR, "403": _ERROR,
                    "409": {"description": "The migration's action is not local-migrate, "
                                           "or the target refuses this message for good "
                                           "(e.g. a folder name too long for its storage).",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Error"}}}},
                    "413": _ERROR, "503": _ERROR,
                },
            },
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "The token given at enrolment."}},
        "responses": {"Error": {"description": "An error.", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
            "Task": {
                "type": "object", "required": ["station", "address", "migration"],
                "properties": {
                    "station": {"type": "string"},
                    "address": {"type": "string"},
                    "migration": {"oneOf": [{"type": "null"}, {
                        "type": "object",
                        "required": ["id", "state", "failed", "target_system", "target_mailbox",
                                     "action", "action_since", "target"],
                        "properties": {
                            "id": {"type": "integer"},
                            "state": {"type": "integer", "description": "Patent state 0-13."},
                            "failed": {"type": "boolean"},
                            "target_system": {"type": "string"},
                            "target_mailbox": {"type": "string"},
                            "action": {"enum": [None, "check1", "check2", "local-migrate"]},
                            "action_since": {"type": ["string", "null"],
                                             "format": "date-time"},
                            "target": {"type": "object",
                                       "description": "E.g. {submission: 'host:port', "
                                                      "submission_tls: 'none', "
                                                      "mailbox_type: 'maildir', imap: {host, "
                                                      "port, tls}} (imap only where the "
                                                      "system has an IMAP server)",
                                       "additionalProperties": True},
                        },
                    }]},
                },
            },
            "Report": {
                "type": "object", "required": ["report_id", "kind", "ok"],
                "properties": {
                    "report_id": {"type": "string", "pattern": _REPORT_ID.pattern},
                    "migration_id": {"type": ["integer", "null"], "minimum": 0,
                                     "maximum": MAX_ID},
                    "kind": {"enum": sorted(REPORT_KINDS)},
                    "ok": {"type": "boolean"},
                    "detail": {"type": "object", "additionalProperties": True,
                               "description": "At most 256 KiB as JSON (else 413)."},
                },
            },
            "ReportAck": {"type": "object", "required": ["stored"],
                          "properties": {"id": {"type": "integer"},
                                         "stored": {"type": "boolean"}}},
            "Message": {
                "type": "object", "required": ["folder", "data"],
                "properties": {
                    "folder": {"type": "string", "maxLength": MAX_FOLDER_CHARS,
                               "pattern": FOLDER_PATTERN,
                               "examples": ["Local Folders/Archive"]},
                    "flags": {"type": "string", "pattern": "^[DFPRST]*$"},
                    "internal_date": {"type": ["number", "null"], "minimum": 0,
                                      "maximum": MAX_DATE},
                    "data": {"type": "string", "contentEncoding": "base64",
                             "pattern": BASE64_PATTERN,
                             "description": "The raw message (non-empty), base64."},
                },
            },
            "MessageAck": {"type": "object", "required": ["present", "sha256"],
                           "properties": {"present": {"type": "boolean"},
                                          "sha256": {"type": "string"},
                                          "key": {"type": "string"}}},
        },
    },
}
