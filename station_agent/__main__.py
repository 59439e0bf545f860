"""`python -m station_agent` runs the station agent's command line (see `cli.py`)."""

from __future__ import annotations

import sys

from station_agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
