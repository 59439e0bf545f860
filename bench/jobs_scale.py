"""What the workers' section costs `reconcile status` and the status page at 100,000 mailboxes.

Why: the page's snapshot is refreshed in the background every second or so and must stay
cheap at a whole installation's wave; the workers' section adds three queries to it
(`reconciler/jobs/read.py`). This measures them where they are heaviest: a private
PostgreSQL (tests/pgutil.py) whose state store holds N migrations, every one of them with
a queued data job (a wave queued at once), `--running` of them running on `--workers`
workers (half of those workers not seen for a minute: their jobs "lease expired"), and
procrastinate's tables (the running rows' jobs looked up there).

Measured, `--rounds` times each, median and worst, in the same run:
- `read_jobs` + `jobs_view` (what a snapshot and `reconcile status` add);
- the peer: `read_migrations`, the read every snapshot and every plan already makes of the
  same store (the ratio says what the workers' section adds on top);
- `jobs_table` (the status text of the section) and the page's render of the overview's
  workers section alone.

Usage: `python bench/jobs_scale.py [--mailboxes 100000] [--running 200] [--rounds 10]`.
The last line reads `jobs section N mailboxes: X ms (median), read_migrations Y ms, ratio R`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def timed(call: Callable[[], Any], rounds: int) -> tuple[float, float]:
    """(median, worst) milliseconds of `rounds` calls."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times)


def fill(url: str, mailboxes: int, running: int, workers: int) -> None:
    from sqlalchemy import insert

    from reconciler.state.model import DataJob, DataWorker, Migration
    from reconciler.state.store import open_store
    from reconciler.workers.queue import ensure_schema

    store = open_store(url)
    ensure_schema(url)
    now = datetime.now(UTC)
    with store.session() as session:
        for start in range(0, mailboxes, 10_000):
            ids = range(start, min(start + 10_000, mailboxes))
            session.execute(insert(Migration), [
                {"id": i + 1, "address": f"u{i}@corp.example", "aliases": [],
                 "source_system": f"s{i % 4}", "target_system": "t1",
                 "source_mailbox": f"u{i}", "target_mailbox": f"u{i}",
                 "placement": f"wave{i // 10_000}", "state": 6, "state_since": now,
                 "created_at": now} for i in ids])
            session.execute(insert(DataJob), [
                {"migration_id": i + 1, "step": "E15", "state": 6,
                 "address": f"u{i}@corp.example",
                 "status": "running" if i < running else "queued", "attempts": 1,
                 "worker": f"host{i % workers}:{1000 + i % workers}" if i < running else None,
                 "job_id": i + 1 if i < running else None, "enqueued_at": now,
                 "started_at": now if i < running else None} for i in ids])
        session.execute(insert(DataWorker), [
            {"name": f"host{w}:{1000 + w}", "host": f"host{w}", "pid": 1000 + w,
             "concurrency": -(-running // workers), "heartbeat": 10.0, "stalled": 30.0,
             "started_at": now - timedelta(hours=1),
             "last_seen": now - timedelta(seconds=60 if w % 2 else 1)}
            for w in range(workers)])
    with store.engine.begin() as conn:  # procrastinate's jobs of the running rows
        conn.exec_driver_sql(
            "INSERT INTO procrastinate_jobs (id, queue_name, task_name, status) "
            "SELECT g, 'mailferry-data', 'mailferry.data_step', 'doing' "
            f"FROM generate_series(1, {running}) g")
        conn.exec_driver_sql("ANALYZE")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=100_000)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    from reconciler.engine import read_migrations
    from reconciler.jobs.read import read_jobs
    from reconciler.jobs.view import jobs_view
    from reconciler.state.store import open_store
    from reconciler.status import jobs_table
    from reconciler.web.templating import templates

    from pgutil import PrivatePostgres

    postgres = PrivatePostgres().start()
    try:
        began = time.perf_counter()
        fill(postgres.url, args.mailboxes, args.running, args.workers)
        print(f"filled {args.mailboxes} migrations and data jobs in "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        store = open_store(postgres.url)
        now = datetime.now(UTC)
        view = jobs_view(read_jobs(store), now)
        print(f"view: {view.summary}")
        for _ in range(2):  # warm the server's caches for both
            read_jobs(store)
            read_migrations(store)
        rounds = args.rounds
        results: dict[str, list[tuple[float, float]]] = {}
        for turn in range(3):  # alternating, as the brief asks
            results.setdefault("jobs", []).append(
                timed(lambda: jobs_view(read_jobs(store), now), rounds))
            results.setdefault("migrations", []).append(
                timed(lambda: read_migrations(store), rounds))
            print(f"round {turn + 1}: jobs {results['jobs'][-1][0]:.1f} ms median "
                  f"(worst {results['jobs'][-1][1]:.1f}), read_migrations "
                  f"{results['migrations'][-1][0]:.1f} ms (worst "
                  f"{results['migrations'][-1][1]:.1f})", flush=True)
        text_ms, _ = timed(lambda: jobs_table(view), rounds)
        env = templates()  # the overview needs a whole snapshot: its workers section alone
        source = (REPO / "reconciler/web/templates/_overview.html").read_text()
        part = source[source.index('{% if not snap.jobs.empty %}'):
                      source.index('<section id="fed">')]
        template = env.from_string(part)

        class Snap:
            jobs = view

        render_ms, _ = timed(lambda: template.render(snap=Snap), rounds)
        print(f"status text of the section: {text_ms:.1f} ms; the page's section rendered: "
              f"{render_ms:.1f} ms")
        jobs = statistics.median(m for m, _ in results["jobs"])
        peer = statistics.median(m for m, _ in results["migrations"])
        store.close()
        print(f"jobs section {args.mailboxes} mailboxes: {jobs:.1f} ms (median), "
              f"read_migrations {peer:.1f} ms, ratio {jobs / peer:.3f}")
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
