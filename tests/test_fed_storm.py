"""A kill -9 storm on fed: nothing acknowledged lost, at most one duplicate per delivery
connection per kill.

Eight concurrent senders, 3,000 messages, six SIGKILLs of fed spread over the run, each
followed by a restart on the same state folder; every Message-ID counted at the LMTP sink
(tests/storm.py). What duplicates remain come from deliveries in flight when fed dies (the
system has the message, fed never read its 250): like Postfix, fed delivers at least
once, and a connection has one delivery in flight at a time. So the bound is exact:
kills x connections (fed runs with two here, 12 duplicates = 0.4 %). How many of those
windows a kill hits depends on the machine's load (under CI's parallel tests, 2.8 a kill
at eight connections, 0.58 %): the rate belongs to the issue's denser storm (5,000
messages, 20 kills, next to Postfix), bench/kill_storm.py. Before spool/done.log, the
``done`` marks buffered for the next flush died with the process too (1.0-1.7 % at eight
connections); tests/test_fed_reliability.py holds that case without timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedutil import FakeSystem, Fed
from storm import FedStormServer, storm

pytestmark = pytest.mark.timeout(300)

RCPT = "b@corp.example"
CONNECTIONS = 2  # fed's delivery connections to the sink


def test_a_kill_9_storm_loses_nothing_and_duplicates_only_what_was_in_flight(
        tmp_path: Path) -> None:
    sink = FakeSystem("sink").start()
    fed = Fed(tmp_path / "fed", [sink], extra=["--workers", str(CONNECTIONS)])
    server = FedStormServer(fed)
    try:
        server.start()
        fed.client.put_entry(RCPT, sink.physical("b"))
        result = storm(server, sink.ids, RCPT, messages=3000, senders=8, kills=6,
                       timeout=240)
        print(result.line("fed"))
        assert result.kills == 6 and result.acked > 2500, result
        assert result.lost == 0, result
        assert result.duplicates <= result.kills * CONNECTIONS, result
    finally:
        fed.kill()
        sink.stop()
