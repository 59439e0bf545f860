#!/usr/bin/env python3
"""CPU of one SMTP session object, the fixed cost fed pays per connection.

    bench/fed_session.py

Builds fed's SMTP protocol object (``make_factory``'s factory: ``protocol.py``'s session
plus fed's) 5,000 times on a running loop and prints the best of three means, in
microseconds of process CPU (steady on a shared machine). The peer harness opens a new
connection per message, so this is paid once per message there.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from fed.smtp.server import FedHandler, SmtpSettings, make_factory  # noqa: E402


async def main() -> None:
    settings = SmtpSettings()
    handler = FedHandler.__new__(FedHandler)  # no directory or spool: only built, never used
    FedHandler.__init__(handler, None, None, ["example.test"], settings,  # type: ignore[arg-type]
                        lambda: None)
    factory = make_factory(handler, settings, lambda session: None)
    for _ in range(200):
        factory()
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(5000):
            factory()
        best = min(best, (time.process_time() - started) / 5000)
    print(f"fed SMTP session object: {best * 1e6:.1f} us CPU")


if __name__ == "__main__":
    asyncio.run(main())
