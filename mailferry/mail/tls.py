"""The one TLS client policy of every mailferry client (fed's SMTP/LMTP delivery, the
drivers' health checks, IMAP): certificates verified against the system's roots or a
private CA file, the host name checked, TLS 1.2 the floor.

`MODES` are the spec's words for a mail protocol's TLS: ``none`` (cleartext),
``starttls`` (required: a server that does not offer it is refused, nothing is sent in
cleartext after the greeting), ``implicit`` (TLS from the first byte: IMAPS, SMTPS)."""

from __future__ import annotations

import ssl

MODES = ("none", "starttls", "implicit")


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client context (OSError / ssl.SSLError on an unreadable CA file)."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def describe(exc: BaseException) -> str:
    """What went wrong in a handshake, short: the verification message when there is one
    ("certificate verify failed: IP address mismatch ..."), else the library's words."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc) or type(exc).__name__
