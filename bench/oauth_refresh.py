"""What a token refresh costs: a token-endpoint round trip and a re-login, next to a password login.

One run, one private Dovecot (tests/dovecot.py) with both a passwd-file passdb (PLAIN) and
the oauth2 passdb that asks the local authorization server (tests/oauth2_server.py,
authlib's server side) to introspect every token. Timed, N times each, on a connection
that is already open and greeted (what differs is only the login):

- password: AUTHENTICATE PLAIN (the peer: what every mover login costs without OAuth2);
- cached token: AUTHENTICATE XOAUTH2 with a token from the cache (Dovecot's introspection
  round trip is in it: the server's side of every OAuth2 login);
- refresh + login: the cache emptied first, so the login includes the refresh_token grant
  at the token endpoint (what a mailbox pays once per token lifetime, or after a refusal).

Prints the medians and the ratios to the password login. Needs root (Dovecot).
Usage: python bench/oauth_refresh.py [N]   (default 50)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mailferry.mail import oauth2
from mailferry.mail.imap.client import ImapClient

from dovecot import Dovecot, private_root
from oauth2_server import OAuth2Server


async def timed(port: int, login: Callable[[ImapClient], Awaitable[None]],
                before: Callable[[], None] = lambda: None) -> float:
    client = await ImapClient.connect("127.0.0.1", port, timeout=30)
    try:
        before()
        started = time.perf_counter()
        await login(client)
        return time.perf_counter() - started
    finally:
        await client.logout()


async def run(n: int) -> None:
    auth = OAuth2Server(lifetime=3600).start()
    auth.add_client("bench", "bench-secret", ("refresh_token",))
    introspector = auth.store.clients["dovecot"]
    dovecot = Dovecot(private_root(), "bench-oauth", {"u1": "pw-u1"}, oauth2=(
        auth.introspection_url, "dovecot", introspector.client_secret)).start()
    try:
        refresh = auth.grant_refresh_token("bench", "u1")
        tokens = oauth2.TokenSource(oauth2.OAuth2Settings(
            auth.token_url, "bench", client_secret=lambda: "bench-secret",
            refresh_token=lambda: refresh))
        port = dovecot.port

        def drop() -> None:  # the next login must refresh
            tokens._token, tokens._expires = None, 0.0

        async def password(client: ImapClient) -> None:
            await client.login("u1", "pw-u1")

        async def token(client: ImapClient) -> None:
            await oauth2.imap_login(client, "u1", tokens)

        for _ in range(3):  # warm up both paths (processes, HTTP connections)
            await timed(port, password)
            await timed(port, token, drop)
        figures: dict[str, list[float]] = {"password": [], "cached": [], "refresh": []}
        for _ in range(n):  # interleaved: the machine's load falls on all three alike
            figures["password"].append(await timed(port, password))
            figures["cached"].append(await timed(port, token))
            figures["refresh"].append(await timed(port, token, drop))
        base = statistics.median(figures["password"])
        for name, label in (("password", "password login (PLAIN)"),
                            ("cached", "token login (XOAUTH2, cached token)"),
                            ("refresh", "token refresh + login")):
            value = statistics.median(figures[name])
            print(f"{label:38s} median {value * 1000:7.2f} ms  x{value / base:.2f}")
        extra = statistics.median(figures["refresh"]) - statistics.median(figures["cached"])
        print(f"{'the refresh alone (difference)':38s} median {extra * 1000:7.2f} ms  "
              f"({n} logins each, {tokens.fetches} token fetches)")
    finally:
        dovecot.stop()
        auth.stop()


if __name__ == "__main__":
    asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
