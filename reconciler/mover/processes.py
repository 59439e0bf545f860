"""The mailboxes of one `mover copy` split over forked processes (`--processes N`).

Why processes and not threads: the mover's one event-loop thread is what bounds a copy of
big messages (issue 22: every byte crosses it three times, in from the source, out to the
target and in again for the read-back proof, and is hashed twice), and Python runs one
thread of it at a time. `doveadm backup` and `mbsync` run one process per mailbox in the
benchmark (`PARALLEL=4`), so N mover processes is the like-for-like comparison.

How: the users file's mailboxes are dealt out round-robin into N shares (mailbox i to
share i mod N: each mailbox is copied by exactly one process), and a child is forked per
share before anything is opened (no event loop, no state store, no thread exists yet:
the fork copies no lock held by another thread). Each child runs the ordinary copy of its
share with its own state store connection (SQLite in WAL mode with a busy timeout, or
PostgreSQL) and hands its reports back as a pickle in a private folder. The parent waits
for every child; a child that died (kill -9, a crash) or could not report leaves every
mailbox of its share reported unverified with the reason, never silently missing, and the
exit status says so; a later run resumes those mailboxes from the manifest, as after any
killed copy.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reconciler.mover.pipeline import MailboxReport

Stats = dict[str, Any]
# What a child runs: its share of the users file's lines -> (stats, reports in its order)
Work = Callable[[list[str]], tuple[Stats, list[MailboxReport]]]


def shares(lines: Sequence[str], processes: int) -> list[list[str]]:
    """The lines dealt out round-robin into at most `processes` non-empty shares."""
    count = max(1, min(processes, len(lines)))
    return [list(lines[i::count]) for i in range(count)]


def _child(work: Work, share: list[str], out: Path) -> None:
    """In the forked child: copy the share, write the result, never return."""
    code = 1
    try:
        stats, reports = work(share)
        partial = out.with_suffix(".part")
        partial.write_bytes(pickle.dumps((stats, reports)))
        partial.rename(out)
        code = 0
    except BaseException:  # the parent reports the share as unverified with the reason
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def in_child(work: Callable[[], object]) -> str | None:
    """Run `work` in a forked child and wait for it: None when it succeeded, else how it
    ended (its traceback went to stderr). Why: what it imports and allocates (Alembic,
    creating a new state store) stays out of the parent, whose pages every share's
    process would otherwise carry too."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return None if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else _ended(status)


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"killed by signal {number} ({signal.Signals(number).name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def run_split(lines: Sequence[str], processes: int, work: Work,
              key_of: Callable[[str], str]) -> tuple[list[Stats], list[MailboxReport]]:
    """Run `work` on each share in its own forked process; the children's stats, and one
    report per line in the lines' order (a share whose process gave none: unverified,
    with why). `key_of` names a line's mailbox."""
    if not hasattr(os, "fork"):
        raise SystemExit("mover: --processes needs os.fork (not on this platform)")
    parts = shares(lines, processes)
    folder = Path(tempfile.mkdtemp(prefix="mover-processes-"))  # 0700: reports name users
    children: list[tuple[int, list[str], Path]] = []
    running: set[int] = set()  # forked and not yet waited for (a reaped PID may be reused)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for n, share in enumerate(parts):
            out = folder / f"share-{n}.pickle"
            pid = os.fork()
            if pid == 0:
                _child(work, share, out)
            children.append((pid, share, out))
            running.add(pid)
            print(f"mover: process {pid} copies {len(share)} mailboxes "
                  f"({', '.join(key_of(line) for line in share[:5])}"
                  f"{', ...' if len(share) > 5 else ''})", file=sys.stderr, flush=True)
        stats: list[Stats] = []
        by_key: dict[str, MailboxReport] = {}
        for pid, share, out in children:
            _, status = os.waitpid(pid, 0)
            running.discard(pid)
            if out.exists():
                got, reports = pickle.loads(out.read_bytes())
                stats.append(got)
                by_key.update((r.key, r) for r in reports)
                continue
            why = (f"process {pid} copying this mailbox {_ended(status)} before it "
                   f"reported; run the copy again (it resumes from the manifest)")
            by_key.update((key_of(line), MailboxReport(key_of(line), error=why))
                          for line in share)
        return stats, [by_key[key_of(line)] for line in lines]
    finally:
        for pid in running:  # the parent was interrupted: no orphan copies going on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in running:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()


def merged(stats: list[Stats], seconds: float, parent_rss_mb: float) -> Stats:
    """One stats record for the whole copy: the passes' times are the slowest process's,
    counts and peak memory summed over the processes (the memory the copy used at most)."""
    result: Stats = {"processes": len(stats), "wall_s": round(seconds, 3)}
    for name in ("first_s", "rerun_s"):
        values = [s[name] for s in stats if s.get(name) is not None]
        if values:
            result[name] = max(values)
    for name in ("mailboxes", "copied", "targets_read", "rerun_copied", "rerun_logins_saved"):
        values = [s[name] for s in stats if s.get(name) is not None]
        if values:
            result[name] = sum(values)
    if any("rerun_verified" in s for s in stats):
        result["rerun_verified"] = all(s.get("rerun_verified") for s in stats)
    result["peak_rss_mb"] = round(parent_rss_mb + sum(s.get("peak_rss_mb", 0.0)
                                                      for s in stats), 1)
    result["peak_rss_mb_each"] = [s.get("peak_rss_mb") for s in stats]
    return result
