"""Resolve credentials named by reference in the specs (invariant 7: no secrets in git)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mailferry import secretfile
from reconciler.errors import MailferryError
from reconciler.spec.model import SecretRef


def resolve(ref: SecretRef, *, what: str) -> str:
    """The secret's value, read and checked by `mailferry.secretfile` (one line, no control
    characters); the error names `what` and the variable or file, never the value."""
    try:
        if ref.env is not None:
            return secretfile.read_env(ref.env, "secret")
        if ref.file is not None:
            return secretfile.read_file(ref.file, "secret")
    except secretfile.SecretError as exc:
        raise MailferryError(f"{what}: {exc}") from None
    raise MailferryError(f"{what}: no env or file reference")


def ensure_file_secret(ref: SecretRef) -> None:
    """Create a random secret in a referenced file that does not exist yet (mode 0600)."""
    if ref.file is None or ref.file.startswith(secretfile.CREDENTIALS) \
            or Path(ref.file).exists():
        return  # systemd's credentials are the admin's to provide
    path = Path(ref.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
