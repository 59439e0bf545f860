"""fed leans on aiosmtpd's private members: this test fails loudly when they change.

fed's session class (``fed/smtp/dataphase.py``'s ``LeanSMTP``, ``fed/smtp/server.py``'s ``FedSMTP``)
re-implements ``smtp_DATA`` and ``_getaddr``, replaces ``__dir__`` (aiosmtpd builds its
command table from ``dir(self)``), and overrides or uses ``connection_made``,
``connection_lost``, ``data_received``, ``_handle_client``, ``_timeout_cb``,
``_reset_timeout``, ``_auth_require_tls``, ``_reader``/``_writer``, ``_handle_hooks``,
``_call_handler_hook``, ``_set_post_data_state`` and the class-level
``command_size_limits``. None of that is aiosmtpd's API, so pyproject pins the releases it
was checked against, and this test pins the source of every member fed relies on: when an
upgrade changes one, re-read that member against fed's code, then update ``KNOWN``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect

import aiosmtpd
from aiosmtpd.smtp import SMTP
from packaging.requirements import Requirement

from fed.smtp.dataphase import LeanSMTP

# sha256 (first 16 hex) of inspect.getsource(SMTP.<member>) in aiosmtpd 1.4.6.
KNOWN = {
    "__init__": "8a9ca80f23ad9bf2",  # dir(self) / getmembers, _auth_require_tls, limits
    "smtp_DATA": "3a33f30d3fd6d02f",  # re-implemented in LeanSMTP.smtp_DATA
    "_getaddr": "0aeb21c56ac1260e",  # short-cut in LeanSMTP._getaddr
    "_timeout_cb": "10a7351f9bec2818",
    "_handle_client": "0e4d096403af6c74",
    "connection_made": "77a45df5065bba34",
    "connection_lost": "d3bf6349bc3c25c1",
    "data_received": "e57e2bc9772342e5",
    "_reset_timeout": "fef19b94d28dff31",
    "_set_post_data_state": "1dc8a8abca2a8164",
    "_call_handler_hook": "6ff23a6634ea0307",
    "check_helo_needed": "9829bb73251c983e",
    "check_auth_needed": "812bbc794078b1b0",
    "push": "15f4f1de5e30c337",
}


def test_aiosmtpd_is_a_release_fed_was_tested_with() -> None:
    pins = [Requirement(r) for r in importlib.metadata.requires("mailferry") or []]
    [pin] = [r for r in pins if r.name == "aiosmtpd"]
    assert pin.specifier.contains(aiosmtpd.__version__), (
        f"aiosmtpd {aiosmtpd.__version__} is outside the pinned range {pin.specifier}")
    assert pin.specifier.contains("1.4.6") and not pin.specifier.contains("1.5.0")


def test_the_private_members_fed_relies_on_are_unchanged() -> None:
    changed = {}
    for name, digest in KNOWN.items():
        source = inspect.getsource(getattr(SMTP, name))
        now = hashlib.sha256(source.encode()).hexdigest()[:16]
        if now != digest:
            changed[name] = now
    assert not changed, (
        f"aiosmtpd {aiosmtpd.__version__} changed SMTP members fed overrides or relies on: "
        f"{changed}; re-check fed/smtp/dataphase.py and fed/smtp/server.py against them, "
        "then update KNOWN in this test")
    init = inspect.getsource(SMTP.__init__)
    for needle in ("dir(self)", "inspect.getmembers", "self._auth_require_tls",
                   "self._handle_hooks", "self.command_size_limits.clear()"):
        assert needle in init, f"aiosmtpd's SMTP.__init__ no longer has {needle}"
    for attribute in ("command_size_limits", "command_size_limit", "line_length_limit",
                      "local_part_limit"):
        assert hasattr(SMTP, attribute), f"aiosmtpd's SMTP lost the attribute {attribute}"


def test_lean_session_still_gets_every_command_from_its_dir() -> None:
    """LeanSMTP.__dir__ lists only smtp_*/auth_*: aiosmtpd must still find every
    command (and DATA must be fed's)."""

    class Handler:
        pass

    session = LeanSMTP(Handler())
    methods = session._smtp_methods
    for command in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "AUTH",
                    "STARTTLS"):
        assert command in methods, f"aiosmtpd did not pick up {command} from __dir__"
    assert methods["DATA"].__func__ is LeanSMTP.smtp_DATA
