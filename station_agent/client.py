"""The station agent's HTTP client for the reconciler's station API.

Why the shared blocking client (`mailferry.mail.http`, the package's one HTTP client, on
aiohttp like the station API it talks to). The agent's traffic is a poll every half minute
and a few uploads: blocking calls over one kept-alive connection, the client's loop thread
doing the I/O (it ends with `close()` or the process). Every call of the station API is
idempotent (a report carries its id, a message already there is "present"), so a
kept-alive connection that broke as a call went out is re-opened and the call sent once
more (``retry_idle="all"``).

Why two error classes. What the agent must do with a failure depends on who failed:
`ApiUnreachable` (connection refused, timeout, 5xx) means "try again later, keep the result"
-- the outbox keeps reports, uploads resume on the next run; `ApiRefused` (4xx) means the
reconciler understood and said no (bad token, not our mailbox, not the right moment) and
resending the same request will not change that.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

from mailferry.mail.http import HttpClient, HttpError

USER_AGENT = "mailferry-station-agent/1"


class ApiError(Exception):
    """Any failure talking to the station API."""


class ApiUnreachable(ApiError):
    """The API could not be reached or failed on its side (5xx): retry later."""


class ApiRefused(ApiError):
    """The API answered 4xx: the request itself is refused."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class StationApiClient:
    """Calls the station API as one station, with its bearer token."""

    def __init__(self, base_url: str, station: str, token: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.station = station
        self.token = token
        self.timeout = timeout
        self.http = HttpClient(self.base_url, name="station API",
                               timeout=timeout, retry_idle="all", headers={
                                   "Accept": "application/json",
                                   "Content-Type": "application/json",
                                   "User-Agent": USER_AGENT})

    def _url(self, tail: str) -> str:
        return f"{self.base_url}/v1/stations/{quote(self.station, safe='')}/{tail}"

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        try:
            answer = self.http.request(method, url, data, timeout=timeout or self.timeout,
                                       headers={"Authorization": f"Bearer {self.token}"})
        except HttpError as exc:
            raise ApiUnreachable(f"station API unreachable: {exc}") from None
        status, payload = answer.status, answer.body
        if status >= 400:
            message = _error_message(payload, answer.reason)
            if status >= 500:
                raise ApiUnreachable(f"HTTP {status}: {message}") from None
            raise ApiRefused(status, message) from None
        try:
            parsed = json.loads(payload or b"{}")
        except json.JSONDecodeError:
            raise ApiUnreachable(f"station API answered HTTP {status} with non-JSON") from None
        if not isinstance(parsed, dict):
            raise ApiUnreachable("station API answered with a non-object")
        return status, parsed

    def get_task(self) -> dict[str, Any]:
        """The station's current task (see docs/station-api.md)."""
        return self._call("GET", self._url("task"))[1]

    def post_report(self, report: dict[str, Any]) -> bool:
        """Send one report; True if newly stored, False if the API already had it."""
        status, _ = self._call("POST", self._url("reports"), report)
        return status == 201

    def post_message(self, folder: str, data: bytes, *, flags: str = "",
                     internal_date: float | None = None) -> bool:
        """Upload one message to the target mailbox; True if appended, False if present."""
        body = {"folder": folder, "flags": flags, "internal_date": internal_date,
                "data": base64.b64encode(data).decode("ascii")}
        # Large messages take longer than a poll: give uploads a generous timeout.
        status, _ = self._call("POST", self._url("messages"), body,
                               timeout=max(self.timeout, 120.0))
        return status == 201


def _error_message(payload: bytes, fallback: object) -> str:
    try:
        parsed = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return str(fallback)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])
    return str(fallback)
