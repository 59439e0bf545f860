"""Resolve credentials named by reference in the specs (invariant 7: no secrets in git)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from reconciler.errors import MailferryError
from reconciler.spec.model import SecretRef


def resolve(ref: SecretRef, *, what: str) -> str:
    """The secret's value; a clear error names the variable or file when it is missing."""
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if not value:
            raise MailferryError(f"{what}: environment variable {ref.env} is not set")
        return value.strip()
    if ref.file is not None:
        try:
            return Path(ref.file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MailferryError(f"{what}: cannot read {ref.file}: {exc.strerror}") from None
    raise MailferryError(f"{what}: no env or file reference")


def ensure_file_secret(ref: SecretRef) -> None:
    """Create a random secret in a referenced file that does not exist yet (mode 0600)."""
    if ref.file is None or Path(ref.file).exists():
        return
    path = Path(ref.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
