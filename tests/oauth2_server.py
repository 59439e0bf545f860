"""A local OAuth2 authorization server for tests (authlib's server side), a thread on 127.0.0.1.

What it does: a token endpoint (`/token`) with the refresh_token and client_credentials
grants (RFC 6749 6 and 4.4) issuing short-lived bearer tokens (`lifetime` seconds, set per
test), and an RFC 7662 introspection endpoint (`/introspect`, client-authenticated) that
Dovecot's `oauth2` passdb asks for every login. `revoke_refresh` revokes a refresh token
(what an admin or the user does at the provider); `expire_all` ends every access token now.
Everything is held in memory; the HTTP layer is the standard library's ThreadingHTTPServer
with authlib's generic `AuthorizationServer` (no web framework).

Why real grants and not a fixed token: the claims under test are the cache's (refreshed
before expiry, after a refusal, never logged) and they are only true against an endpoint
that really issues, expires and revokes.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, OAuth2Payload, OAuth2Request, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from sysutil import free_port


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    grants: tuple[str, ...]
    user: str | None = None  # client_credentials: the mailbox the application acts for

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grants


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    client_id: str
    user: str
    access_token: str | None
    refresh_token: str | None
    scope: str
    issued_at: float
    expires_in: float
    revoked: bool = False

    def check_client(self, client: Any) -> bool:
        return bool(client.get_client_id() == self.client_id)

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return int(self.expires_in)

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> str:
        return self.user

    def get_client(self) -> Any:
        return None


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, form: dict[str, str], lists: dict[str, list[str]]) -> None:
        self._form, self._lists = form, lists

    @property
    def data(self) -> dict[str, str]:
        return self._form

    @property
    def datalist(self) -> dict[str, list[str]]:
        return self._lists


class _Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, method: str, uri: str, headers: dict[str, str], body: bytes) -> None:
        super().__init__(method, uri, headers=headers)
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
        lists: dict[str, list[str]] = defaultdict(list)
        for key, value in pairs:
            lists[key].append(value)
        self._form = dict(pairs)
        self.payload = _Payload(self._form, lists)

    @property
    def args(self) -> dict[str, str]:
        return {}

    @property
    def form(self) -> dict[str, str]:
        return self._form


@dataclass
class Store:
    clients: dict[str, Client] = field(default_factory=dict)
    tokens: list[Token] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per grant
    introspections: int = 0


class _RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
    INCLUDE_NEW_REFRESH_TOKEN = False  # like Google: the refresh token stays the same

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        store: Store = self.server.store
        with store.lock:
            for token in store.tokens:
                if token.refresh_token == refresh_token and not token.revoked:
                    return token
        return None

    def authenticate_user(self, refresh_token: Token) -> str:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: Token) -> None:
        return None  # not rotated


class _CredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class _Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        store: Store = self.server.store
        with store.lock:
            store.introspections += 1
            return next((t for t in store.tokens if t.access_token == token_string), None)

    def check_permission(self, token: Token, client: Client, request: Any) -> bool:
        return client.client_id == "dovecot"

    def introspect_token(self, token: Token) -> dict[str, Any]:
        return {"active": True, "client_id": token.client_id, "token_type": "Bearer",
                "username": token.user, "scope": token.scope,
                "exp": int(token.issued_at + token.expires_in), "iat": int(token.issued_at)}


class _Server(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, store: Store, owner: OAuth2Server) -> None:
        super().__init__()
        self.store = store
        self.owner = owner
        self.register_token_generator("default", BearerTokenGenerator(
            lambda *a, **k: secrets.token_urlsafe(24),
            expires_generator=lambda client, grant_type: owner.lifetime))
        self.register_grant(_RefreshGrant)
        self.register_grant(_CredentialsGrant)
        self.register_endpoint(_Introspection)

    def query_client(self, client_id: str) -> Client | None:
        return self.store.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        client = request.client
        user = request.user if request.user is not None else client.user
        with self.store.lock:
            self.store.issued[request.payload.grant_type] += 1
            self.store.tokens.append(Token(
                client.client_id, str(user), token.get("access_token"),
                token.get("refresh_token"), str(token.get("scope") or ""), time.time(),
                float(token.get("expires_in") or self.owner.lifetime)))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
        return status, body, headers


class OAuth2Server:
    """The server, its clients and tokens; `start()` serves on 127.0.0.1:`port`."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.store = Store()
        self.port = free_port()
        self.auth = _Server(self.store, self)
        self.add_client("dovecot", secrets.token_urlsafe(16), ())  # introspection only
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def introspection_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/introspect"

    def add_client(self, client_id: str, secret: str, grants: tuple[str, ...],
                   user: str | None = None) -> Client:
        client = Client(client_id, secret, grants, user)
        self.store.clients[client_id] = client
        return client

    def grant_refresh_token(self, client_id: str, user: str, scope: str = "") -> str:
        """A refresh token as a user's consent would give one (no authorization code
        dance: what the tests need is a valid refresh token for `user`)."""
        refresh = secrets.token_urlsafe(32)
        with self.store.lock:
            self.store.tokens.append(Token(client_id, user, None, refresh, scope, time.time(),
                                           10 * 365 * 86400.0))
        return refresh

    def revoke_refresh(self, refresh: str) -> None:
        with self.store.lock:
            for token in self.store.tokens:
                if token.refresh_token == refresh:
                    token.revoked = True

    def expire_all(self) -> None:
        """Every access token issued so far ends now (a provider's revocation)."""
        with self.store.lock:
            for token in self.store.tokens:
                if token.access_token is not None:
                    token.expires_in = 0.0

    def access_tokens(self) -> list[str]:
        with self.store.lock:
            return [t.access_token for t in self.store.tokens if t.access_token]

    def start(self) -> OAuth2Server:
        auth = self.auth

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None  # quiet: the tests read the store

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = _Request("POST", f"http://127.0.0.1{self.path}",
                                   dict(self.headers.items()), body)
                if self.path == "/token":
                    status, payload, headers = auth.create_token_response(request)
                elif self.path == "/introspect":
                    status, payload, headers = auth.create_endpoint_response(
                        "introspection", request)
                else:
                    status, payload, headers = 404, {"error": "not_found"}, []
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for key, value in headers or []:
                    if key.lower() != "content-type":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="oauth2-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
