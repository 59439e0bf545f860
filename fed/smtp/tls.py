"""STARTTLS for fed's SMTP listener: one server context built from a cert and a key file.

Optional (``--tls-cert`` with ``--tls-key``): fed usually sits on a private network next to
the mail systems, but when outside clients or AUTH users reach it, passwords and mail must
not cross the wire in clear. TLS 1.2 is the floor; the library's default cipher choice is
kept (it tracks current advice better than a list pinned here would).
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for STARTTLS; raises OSError/ssl.SSLError on bad files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context
