#!/usr/bin/env python3
"""Where fed's time went, from py-spy's raw output (``py-spy record -f raw``).

    bench/pyspy_shares.py SPY.txt [SPY.txt ...]

Each sample (one stack, ``frame;frame;... count``) is counted under the first category
whose marker appears on its stack, in the order below, so a reply written from the DATA
phase counts as a reply and a log line from the relay as logging. Prints the share of
every category and the 15 functions with the most samples of their own (the leaf frame).
Used by bench/fed_profile.sh; the table in docs/fed.md ("Where a message's time goes") has
these categories.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("logging/__init__.py",)),
    ("SMTP replies (push: the send syscall)", ("SMTP.push", "SMTPProtocol._flush")),
    ("SMTP session set-up", ("FedSMTP.__init__", "SMTP.__init__", "SMTPProtocol.__init__",
                             "connection_made",
                             "factory (")),
    ("relay to the next hop (smtpclient, scheduler)", ("smtpclient.py", "scheduler.py")),
    ("delivery outcomes, unlinks", ("write_outcomes", "reuse", "remove_file", "mark_done",
                                    "_flush_soon")),
    ("node agent", ("node_agent.py", "nodes.py")),
    ("fsync rounds", ("try_fsync", "try_fdatasync")),
    ("spool file writes", ("_write_batch",)),
    ("index (SQLite)", ("_commit_batch",)),
    ("thread hand-off", ("to_thread", "run_in_executor", "_WorkItem", "_worker (concurrent",
                         "wrap_future", "ThreadPoolExecutor", "futures/_base.py")),
    ("SMTP DATA phase", ("smtp_DATA", "handle_DATA", "_data_chunk")),
    ("SMTP commands", ("_handle_client", "SMTPProtocol._process")),
]
OTHER = "event loop (uvloop's C, callbacks) and the rest"
_LINE = re.compile(r":\d+\)$")


def shares(paths: list[str]) -> tuple[Counter[str], Counter[str], int]:
    """(samples per category, samples per leaf function, total samples)."""
    by_category: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    total = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as raw:
            for line in raw:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                total += n
                by_category[next((name for name, markers in CATEGORIES
                                  if any(m in stack for m in markers)), OTHER)] += n
                by_leaf[_LINE.sub(")", stack.rsplit(";", 1)[-1])] += n
    return by_category, by_leaf, total


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    by_category, by_leaf, total = shares(argv)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples")
    for name in [n for n, _ in CATEGORIES] + [OTHER]:
        print(f"{100 * by_category[name] / total:5.1f} %  {name}")
    print("-- own samples (leaf frame), top 15")
    for name, n in by_leaf.most_common(15):
        print(f"{100 * n / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
