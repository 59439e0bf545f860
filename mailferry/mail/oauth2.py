"""OAuth2 access tokens for IMAP logins (SASL XOAUTH2 and OAUTHBEARER, RFC 7628): the one cache.

Why: Microsoft 365 turned basic authentication off and Google discourages it; their IMAP
servers take a bearer token instead of a password. A token comes from the provider's token
endpoint, either for a *refresh token* (a user consented once; `grant: refresh_token`) or
for the application itself (`grant: client_credentials`, Microsoft's app-only access), and
lives about an hour. The mover, the drivers and the station agent all log in through this
module, so there is one place that

- asks the token endpoint with authlib's OAuth2 client (not hand-written HTTP), verifying
  the endpoint's certificate (the system's roots or `cafile`);
- keeps each token until shortly before it expires (`margin`: a quarter of its lifetime,
  at most two minutes) and then fetches a new one *before* a login would fail;
- drops a token the IMAP server refused and fetches one more (`refused`): a token revoked
  early or a clock that drifted costs one retry, not a failed mailbox;
- keeps a refresh token the endpoint rotated (a new `refresh_token` in the answer) in
  memory for this process; the original secret is re-read at the next start;
- never logs or raises a token, a refresh token or a client secret: errors name the token
  endpoint, the grant and the provider's error code (`invalid_grant`), and any secret that
  would still appear in a server's text is cut out (`_scrub`).

Who shares a token: a `TokenSource` per (endpoint, client, grant, scope, refresh token
reference), from `tokens_for`. With client credentials that is one token for every mailbox
of a system (the application acts for all of them, the IMAP login names the mailbox); with
refresh tokens it is one per mailbox, each with its own refresh token.

Errors: `OAuth2Error`, with `permanent` set when the endpoint refused the grant or the
client (`invalid_grant`, `invalid_client`, ...) or a secret could not be read (an admin
must act, retrying will not help), unset when the endpoint could not be reached or failed
(retry later).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailferry.mail.imap.client import ImapClient, ImapCommandError

log = logging.getLogger("mailferry.oauth2")

GRANTS = ("refresh_token", "client_credentials")
MECHANISMS = ("xoauth2", "oauthbearer")
MAX_MARGIN = 120.0  # seconds before expiry at which a token is replaced
DEFAULT_LIFETIME = 300.0  # an answer without expires_in: assume five minutes
HTTP_TIMEOUT = 30.0
# Provider error codes that only an admin can fix (RFC 6749 5.2): no retry.
PERMANENT = frozenset({"invalid_grant", "invalid_client", "unauthorized_client",
                       "unsupported_grant_type", "invalid_scope", "invalid_request",
                       "access_denied"})


class OAuth2Error(Exception):
    """No token could be had; the message names the endpoint and the step, never a secret."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class OAuth2Settings:
    """Where and how to get tokens. Secrets are callables, read at every fetch (by
    reference, like every password: a rotated file is picked up)."""

    token_url: str
    client_id: str
    grant: str = "refresh_token"  # refresh_token | client_credentials
    client_secret: Callable[[], str] | None = None  # None: a public client
    refresh_token: Callable[[], str] | None = None  # grant refresh_token
    scope: str | None = None
    mechanism: str = "xoauth2"  # xoauth2 | oauthbearer
    cafile: str | None = None  # CA bundle for the token endpoint's certificate
    refresh_ref: str = ""  # which refresh token (a file or variable name): part of the key

    def __repr__(self) -> str:  # the callables are secrets' readers: show none of it
        return f"OAuth2Settings({self.grant} at {self.token_url}, client {self.client_id})"


class TokenSource:
    """One cached access token and how to get the next (thread-safe: the blocking sessions
    run in threads, the mover asks from its event loop through `asyncio.to_thread`)."""

    def __init__(self, settings: OAuth2Settings, *, where: str = "") -> None:
        if settings.grant not in GRANTS:
            raise ValueError(f"OAuth2 grant {settings.grant!r} is not one of {GRANTS}")
        if settings.mechanism not in MECHANISMS:
            raise ValueError(f"OAuth2 mechanism {settings.mechanism!r} is not one of "
                             f"{MECHANISMS}")
        self.settings = settings
        self.where = where  # "system: ..." in front of messages
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0  # time.monotonic() at which the token expires
        self._margin = 0.0
        self._rotated: str | None = None  # a refresh token the endpoint handed back
        self.fetches = 0  # round trips to the token endpoint (tests, bench)

    def __repr__(self) -> str:
        return f"TokenSource({self.settings!r})"

    @property
    def mechanism(self) -> str:
        return self.settings.mechanism

    def token(self) -> str:
        """A token valid for at least the margin: the cached one, or a fresh one."""
        with self._lock:
            if self._token is not None and time.monotonic() < self._expires - self._margin:
                return self._token
            return self._fetch()

    def refused(self, token: str) -> None:
        """The IMAP server refused `token`: never hand it out again."""
        with self._lock:
            if self._token == token:
                self._token, self._expires = None, 0.0

    def _fetch(self) -> str:
        from authlib.integrations.base_client.errors import OAuthError
        from authlib.integrations.requests_client import OAuth2Session

        s = self.settings
        step = f"{self.where}OAuth2 {s.grant} grant at {s.token_url}"
        secrets: list[str] = []
        try:
            secret = s.client_secret() if s.client_secret is not None else None
            if secret:
                secrets.append(secret)
            refresh = None
            if s.grant == "refresh_token":
                if s.refresh_token is None and self._rotated is None:
                    raise OAuth2Error(f"{step}: no refresh token configured", permanent=True)
                refresh = self._rotated or (s.refresh_token() if s.refresh_token else None)
                if refresh:
                    secrets.append(refresh)
        except OAuth2Error:
            raise
        except Exception as exc:  # a secret that cannot be read: its reader's message
            # (an admin must fix the file: no retry within this run helps)
            raise OAuth2Error(f"{step}: {exc}", permanent=True) from None
        session = OAuth2Session(
            s.client_id, secret, scope=s.scope,
            token_endpoint_auth_method="client_secret_post" if secret else "none")
        session.verify = s.cafile or True
        started = time.monotonic()
        try:
            if s.grant == "client_credentials":
                answer = session.fetch_token(s.token_url, grant_type="client_credentials",
                                             timeout=HTTP_TIMEOUT)
            else:
                answer = session.refresh_token(s.token_url, refresh_token=refresh,
                                               timeout=HTTP_TIMEOUT)
        except OAuthError as exc:
            code = str(exc.error or "error")
            described = f": {exc.description}" if exc.description else ""
            raise OAuth2Error(_scrub(f"{step} refused: {code}{described}"[:400], secrets),
                              permanent=code in PERMANENT) from None
        except Exception as exc:  # network, TLS, an answer that is not JSON
            raise OAuth2Error(_scrub(f"{step} failed: {type(exc).__name__}: {exc}"[:400],
                                     secrets), permanent=False) from None
        finally:
            session.close()
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise OAuth2Error(f"{step}: the answer holds no access_token", permanent=False)
        lifetime = float(answer.get("expires_in") or DEFAULT_LIFETIME)
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != refresh:
            self._rotated = rotated
        self._token = token
        self._expires = started + lifetime  # counted from the request: never too late
        self._margin = min(MAX_MARGIN, lifetime / 4)
        self.fetches += 1
        log.info("%sOAuth2 token from %s (%s grant, valid %.0f s)", self.where, s.token_url,
                 s.grant, lifetime)
        return token


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[secret]")
    return text


_SOURCES: dict[tuple[str, ...], TokenSource] = {}
_SOURCES_LOCK = threading.Lock()


def tokens_for(settings: OAuth2Settings, *, where: str = "") -> TokenSource:
    """The process's one TokenSource for these settings (a new one when first asked)."""
    key = (settings.token_url, settings.client_id, settings.grant, settings.scope or "",
           settings.refresh_ref, settings.mechanism, settings.cafile or "")
    with _SOURCES_LOCK:
        source = _SOURCES.get(key)
        if source is None:
            source = _SOURCES[key] = TokenSource(settings, where=where)
        return source


# -- SASL (RFC 7628 and Google's XOAUTH2) ---------------------------------------------------
async def imap_login(client: ImapClient, user: str, tokens: TokenSource) -> None:
    """Log `client` in as `user` with a token from `tokens`; a refused token is dropped and
    a fresh one tried once (the token was revoked, or expired between cache and server).
    Raises `OAuth2Error` when no token can be had, `ImapCommandError` when the server
    refuses a fresh token too."""
    if f"AUTH={tokens.mechanism.upper()}" not in client.capabilities:
        raise ImapCommandError("AUTHENTICATE", "NO", f"the server does not offer "
                               f"AUTH={tokens.mechanism.upper()}")
    token = await asyncio.to_thread(tokens.token)
    try:
        await client.login_oauth(user, token, mechanism=tokens.mechanism)
        return
    except ImapCommandError as exc:
        if "[UNAVAILABLE]" in exc.text.upper():
            raise  # the server's auth backend is down: not the token's fault
        tokens.refused(token)
    fresh = await asyncio.to_thread(tokens.token)
    log.info("%s: %s refused a token for %s: retrying with a fresh one", client.where,
             tokens.mechanism.upper(), user)
    await client.login_oauth(user, fresh, mechanism=tokens.mechanism)
