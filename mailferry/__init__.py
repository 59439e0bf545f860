"""mailferry: what every part shares and no part owns.

The installed version, the package data (JSON Schemas, quickstart specs, CI pipelines,
systemd units: `resources`) and the few lines a long-running service needs (`service`:
private files, sd_notify). fed, the maildir system, the station agent and the reconciler
may all import from here; it imports none of them.
"""

from __future__ import annotations

__version__: str  # the installed version, read when first asked for (`__getattr__`)


def __getattr__(name: str) -> str:
    """`__version__`, from the installed package's metadata on first use: importing
    `importlib.metadata` is 20 ms, a seventh of a `mover copy` process's imports, and only
    `--version` needs it (issue 22)."""
    if name != "__version__":
        raise AttributeError(f"module 'mailferry' has no attribute {name!r}")
    from importlib import metadata
    try:
        version = metadata.version("mailferry")
    except metadata.PackageNotFoundError:  # a source tree run without an install
        version = "0+unknown"
    globals()["__version__"] = version
    return version
