"""SMTP AUTH for fed: who may relay from anywhere (see ``policy.py``, rule b).

Credentials live in a file named on the command line (``--auth-file``), never on the
command line itself (invariant 7). One ``user:hash`` line per account, ``#`` comments;
the hash is ``scrypt$N$r$p$salt$key`` (base64 salt and key), made by ``fed auth-hash``.
scrypt because it is in the standard library and memory-hard: a stolen file is expensive
to brute-force. Checking costs a few tens of milliseconds on the event loop, so fed limits
AUTH attempts per connection (``server.py``) and failed logins per client address
(``AuthThrottle``: after ``max_failures`` failures within ``window`` seconds, AUTH from that
address gets ``454 4.7.0`` without any hashing, which also stops password guessing spread
over many connections). An unknown user costs the same as a wrong password, so timing does
not reveal which accounts exist.

The session (``protocol.py``) only offers and accepts AUTH (PLAIN, LOGIN) after STARTTLS;
``server.py`` lifts that for loopback clients, where nobody can sniff the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

log = logging.getLogger("fed.auth")

N, R, P = 2**14, 8, 1
_DUMMY = f"scrypt${N}${R}${P}$" + base64.b64encode(b"0" * 16).decode() + "$" \
    + base64.b64encode(b"0" * 32).decode()


class CredentialsError(Exception):
    """The credentials file is unreadable or malformed."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The stored form of a password."""
    salt = salt or secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt${N}${R}${P}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: bytes, stored: str) -> bool:
    """True if `password` matches the stored hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        got = hashlib.scrypt(password, salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(expected), maxmem=256 << 20)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def load_credentials(path: Path) -> dict[str, str]:
    """user -> stored hash, from a credentials file."""
    users: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise CredentialsError(f"{path}:{number}: expected user:scrypt$N$r$p$salt$key")
        users[user] = stored
    return users


class AuthThrottle:
    """Failed logins per client IP in a sliding window (in memory, event loop only)."""

    def __init__(self, max_failures: int = 10, window: float = 600.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str, now: float) -> deque[float]:
        times = self.failures.get(ip, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            self.failures.pop(ip, None)
        return times

    def blocked(self, ip: str) -> bool:
        """True while `ip` has used up its failures."""
        return len(self._recent(ip, time.monotonic())) >= self.max_failures

    def failed(self, ip: str) -> None:
        """Record one failed login from `ip`."""
        now = time.monotonic()
        times = self._recent(ip, now)
        times.append(now)
        self.failures[ip] = times
        if len(self.failures) > 100_000:  # bounded memory under a spray of addresses
            self.failures.pop(next(iter(self.failures)))


class Authenticator:
    """The session's ``authenticator`` (aiosmtpd's signature): checks PLAIN/LOGIN
    credentials against the file."""

    def __init__(self, users: dict[str, str], throttle: AuthThrottle | None = None) -> None:
        self.users = users
        self.throttle = throttle or AuthThrottle()

    def __call__(self, server: object, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        """Succeed only for a known user with the right password."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ip = str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer)
        if self.throttle.blocked(ip):
            log.warning("AUTH from %s refused: too many failed logins", ip)
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 too many failed logins, try again later")
        user = auth_data.login.decode("utf-8", "replace")
        stored = self.users.get(user)
        # Hash even for an unknown user: the answer time must not tell which users exist.
        ok = verify_password(auth_data.password, stored or _DUMMY) and stored is not None
        log.info("AUTH %s for %r from %s: %s", mechanism, user, session.peer,
                 "ok" if ok else "refused")
        if not ok:
            self.throttle.failed(ip)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)
