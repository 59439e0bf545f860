"""Enrolment as one help-desk command: the token, and a ready-to-use agent configuration.

Why. Setting up a station used to mean: enrol it, copy the printed token into a file, write
the agent's command line by hand. A help desk does this for hundreds of workstations, and
every manual step is a chance for a typo that shows up only on migration day. So
`reconcile station enrol NAME --address ADDR --out DIR --api URL` writes the two files a
workstation needs into DIR -- `station.token` (mode 0600: the only copy of the token, whose
hash alone the state store keeps) and `station-agent.toml` (every setting, commented) -- and
prints the one command that runs the agent. The configuration format itself is the agent's
(`station_agent.config.render`), so the two sides cannot disagree about it.
"""

from __future__ import annotations

import os
from pathlib import Path

from station_agent.config import render

TOKEN_NAME = "station.token"
CONFIG_NAME = "station-agent.toml"


def write_station_kit(out_dir: Path, *, api: str, station: str, address: str, token: str,
                      client: str = "thunderbird") -> tuple[Path, Path]:
    """Write the token file (0600) and the agent configuration; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    token_path = out_dir / TOKEN_NAME
    # Created with 0600 from the start: the token is never readable by others, not even
    # for the instant between a write and a chmod.
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.chmod(token_path, 0o600)
    config_path = out_dir / CONFIG_NAME
    config_path.write_text(render(api=api, station=station, address=address,
                                  token_file=TOKEN_NAME, client=client), encoding="utf-8")
    return token_path, config_path
