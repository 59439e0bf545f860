"""The one retry schedule of mailferry: exponential back-off with a cap and optional jitter.

Like Postfix's ``minimal_backoff_time`` / ``maximal_backoff_time``: the first retry waits
about `base` seconds, each next one twice as long, never more than `cap`. Jitter ("equal
jitter": uniformly between half and all of the step) keeps many clients that failed together
(a system restarting under a backlog, a fleet of station agents) from all coming back in the
same second.

Who uses it, and with jitter or not:

- fed's delivery (``retry_base``/``retry_max``) and the restart of fed's node processes:
  jitter, many recipients or processes fail together;
- the reconciler's steps (``steps/registry.py``: a step's ``backoff``/``max_backoff``) and
  ``reconcile --watch`` after a failed pass: no jitter, the delay is shown to a person (the
  plan's "retry in", the watch's notice) and stored in the state, and one reconciler per
  specs repository runs them;
- the mover's reconnection to a server (cap 15 s) and the station agent's retry of a local
  migration: no jitter, as before (one connection per mailbox, one agent per station).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

MAX_DOUBLINGS = 60  # 2**60 * base is past any cap; keeps the float finite


def backoff(attempt: int, base: float, cap: float = math.inf, *, jitter: bool = True,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (1: the first retry): `base` doubled
    `attempt - 1` times, at most `cap`; with `jitter`, uniformly in [step/2, step]."""
    step = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, MAX_DOUBLINGS))
    if not jitter:
        return float(step)
    return step / 2 + rand() * step / 2
