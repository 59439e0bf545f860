"""mailferry: what every part shares and no part owns.

The installed version, the package data (JSON Schemas, quickstart specs, CI pipelines,
systemd units: `resources`) and the few lines a long-running service needs (`service`:
private files, sd_notify). fed, the maildir system, the station agent and the reconciler
may all import from here; it imports none of them.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("mailferry")
except metadata.PackageNotFoundError:  # a source tree run without an install
    __version__ = "0+unknown"
