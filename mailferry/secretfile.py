"""The one reader of secrets (tokens, passwords): a file of one line, or an environment variable.

Why one reader. A token ends up in an HTTP header, a password in an IMAP command: a second
line or a control character there is at best a confusing error and at worst the secret
printed whole -- http.client refuses such a header with ``ValueError: Invalid header value
b'Bearer first-line-secret\\nsecond-line'``, and with ``/etc/shadow`` as the token file that is
all of it, in a traceback. So every secret is checked here, once, when it is read, and every
message names *where* the secret came from and what is wrong with it, never its text
(``token file /etc/fed.token: more than one line``). Each caller wraps `SecretError` in its
own error type or exit code.

Accepted: UTF-8 text whose only line may end with a newline (LF or CRLF); blanks around it
are dropped. Refused: a missing or unreadable file, an empty one, more than one line, any
other control character, bytes that are not UTF-8.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_SECRET_BYTES = 64 * 1024  # a token is 43 bytes; this only stops reading /dev/zero whole
# A secret file named relative to systemd's credentials directory (LoadCredential=): the
# same specs then name the same credential in every unit (reconciler, each worker), whose
# directories differ (/run/credentials/UNIT/); docs/deployment.md.
CREDENTIALS = "$CREDENTIALS_DIRECTORY/"


class SecretError(ValueError):
    """A secret could not be read or is malformed; the message never contains it."""


def check(value: str, where: str) -> str:
    """`value` without surrounding blanks, or SecretError naming `where` and the problem."""
    value = value.strip()
    if not value:
        raise SecretError(f"{where}: empty")
    if "\n" in value or "\r" in value:
        raise SecretError(f"{where}: more than one line")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise SecretError(f"{where}: contains a control character")
    return value


def credential_path(path: str | os.PathLike[str], what: str = "token") -> Path:
    """`path`, with a leading ``$CREDENTIALS_DIRECTORY/`` replaced by that variable (set by
    systemd for a unit with LoadCredential=); SecretError if it is not set."""
    text = os.fspath(path)
    if not text.startswith(CREDENTIALS):
        return Path(text)
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise SecretError(f"{what} file {text}: $CREDENTIALS_DIRECTORY is not set (systemd "
                          "sets it for a unit with LoadCredential=)")
    return Path(folder) / text[len(CREDENTIALS):]


def read_file(path: str | os.PathLike[str], what: str = "token") -> str:
    """The secret in the file at `path` (see the module for what is accepted; a leading
    ``$CREDENTIALS_DIRECTORY/`` is systemd's credentials directory)."""
    where = f"{what} file {os.fspath(path)}"
    path = credential_path(path, what)
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"{where}: cannot read: {exc.strerror or type(exc).__name__}") \
            from None
    if len(raw) > MAX_SECRET_BYTES:
        raise SecretError(f"{where}: larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{where}: not UTF-8 text") from None
    return check(text, where)


def read_env(name: str, what: str = "token") -> str:
    """The secret in environment variable `name` (the same rules as a file's)."""
    value = os.environ.get(name)
    if value is None:
        raise SecretError(f"{what} variable ${name}: not set")
    return check(value, f"{what} variable ${name}")
