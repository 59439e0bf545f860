"""The one retry schedule of fed: exponential back-off with jitter and a cap.

Like Postfix's ``minimal_backoff_time`` / ``maximal_backoff_time``: the first retry waits
about `base` seconds, each next one twice as long, never more than `cap`. Jitter ("equal
jitter": uniformly between half and all of the step) keeps many recipients that failed
together (a system restarting under a backlog) from all coming back in the same second.
Used by delivery (``delivery.py``) and by the restart of a node process (``procs.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff(attempt: int, base: float, cap: float,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (1: the first retry)."""
    step = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 60))
    return step / 2 + rand() * step / 2
