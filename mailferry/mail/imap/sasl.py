"""The client's side of SASL's bearer-token mechanisms, XOAUTH2 and OAUTHBEARER (RFC 7628).

Pure encoding, no I/O: the IMAP client (`mailferry.mail.imap.client`) sends these bytes, and
`mailferry.mail.oauth2` gets the tokens and retries a refused one. Apart from both so that
neither imports the other back.
"""

from __future__ import annotations

import base64
import json
from typing import Any


def initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> str:
    """The base64 client response of XOAUTH2 or OAUTHBEARER (RFC 7628 3.1: a GS2 header
    naming the user, host and port, then the bearer token)."""
    if mechanism.lower() == "xoauth2":
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    elif mechanism.lower() == "oauthbearer":
        gs2_user = user.replace("=", "=3D").replace(",", "=2C")
        raw = f"n,a={gs2_user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    else:
        raise ValueError(f"SASL mechanism {mechanism!r} is not xoauth2 or oauthbearer")
    return base64.b64encode(raw.encode()).decode()


def failure_detail(challenge: bytes) -> str:
    """The server's error of a refused token (RFC 7628 3.2.2: a base64 JSON challenge with
    `status`, `scope`), as "status 401" or "" when unreadable."""
    try:
        info: Any = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (ValueError, TypeError):
        return ""
    if not isinstance(info, dict):
        return ""
    parts = [f"status {info['status']}"] if "status" in info else []
    if info.get("scope"):
        parts.append(f"scope {info['scope']}")
    return ", ".join(str(p) for p in parts)[:200]
