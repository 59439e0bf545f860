"""The workers' data jobs as `reconcile status` and the page show them (reconciler.jobs.view,
PURE): a job's lease is its worker's `last_seen` within its `stalled`; a job whose worker is
not seen, gone, or whose procrastinate job was handed back is "lease expired, waiting for
another worker"; queued jobs are counted per source and target system; each worker says
what it runs and when it was last seen; nothing at all without workers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reconciler.jobs.view import (
    EXPIRED,
    JobFact,
    JobFacts,
    JobsView,
    QueuedFact,
    WorkerFact,
    jobs_view,
)
from reconciler.status import StatusRow, jobs_records, jobs_table, table

NOW = datetime(2026, 12, 4, 22, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def worker(name: str, seen: float, stalled: float = 30.0, concurrency: int = 4) -> WorkerFact:
    host, _, pid = name.partition(":")
    return WorkerFact(name, host, int(pid), concurrency, 10.0, stalled, ago(3600), ago(seen))


def job(address: str, who: str | None, *, status: str = "running", step: str = "E15",
        started: float = 12.0, attempts: int = 1, abandoned: bool = False) -> JobFact:
    return JobFact(address=address, step=step, status=status, worker=who, attempts=attempts,
                   enqueued_at=ago(100), started_at=ago(started), source="s1", target="s2",
                   abandoned=abandoned)


FACTS = JobFacts(
    jobs=(job("a@x", "h1:1"), job("b@x", "h2:2", step="E41", attempts=2),
          job("c@x", "h3:3", abandoned=True), job("d@x", "h9:9"),
          job("e@x", "h1:1", status="done", step="E11")),
    queued=(QueuedFact("s1", "s2", "E15", 7, ago(50)), QueuedFact("s1", "s2", "E41", 2, ago(5)),
            QueuedFact("s3", "s2", "prestage", 1, ago(1))),
    workers=(worker("h1:1", 0.4), worker("h2:2", 31.0), worker("h3:3", 1.0)))


def test_a_job_runs_on_a_live_worker_until_its_lease_expires() -> None:
    view = jobs_view(FACTS, NOW)
    by = {j.address: j for j in view.jobs}
    a = by["a@x"]
    assert (a.state, a.worker, a.what, a.attempts) == ("running", "h1:1",
                                                       "E15 copy + verification", 1)
    assert a.since == ago(12) and a.seconds == 12.0 and a.heartbeat_age == 0.4
    assert a.text == "running on h1:1 for 12 s, heartbeat 0.4 s ago, attempt 1"
    # h2:2 not seen for 31 s, its lease 30 s: dead to the fleet.
    assert by["b@x"].state == "lease expired" and by["b@x"].expired
    assert by["b@x"].text == f"{EXPIRED} (h2:2 last seen 31 s ago)"
    assert by["b@x"].what == "E41 final delta + verification"
    # A live worker whose procrastinate job was handed back runs it no more.
    assert by["c@x"].text == f"{EXPIRED} (h3:3 gave it up)"
    # A worker with no row (stopped, or forgotten) runs nothing.
    assert by["d@x"].text == f"{EXPIRED} (h9:9 is gone)" and by["d@x"].heartbeat_age is None
    assert by["e@x"].state == "done" and by["e@x"].what == "E12 validation"
    # The expired first, then the running, then the results to record.
    assert [j.address for j in view.jobs] == ["b@x", "c@x", "d@x", "a@x", "e@x"]


def test_the_same_job_once_another_worker_took_it() -> None:
    """After h2:2's lease expired, h1:1 claimed the row (the row names it, attempt 2)."""
    taken = JobFacts(jobs=(job("b@x", "h1:1", step="E41", started=0.5, attempts=2),),
                     workers=FACTS.workers)
    (b,) = jobs_view(taken, NOW).jobs
    assert (b.state, b.worker, b.attempts) == ("running", "h1:1", 2)


def test_queued_counted_per_source_and_target() -> None:
    view = jobs_view(FACTS, NOW)
    assert [(q.source, q.target, q.count, q.steps, q.oldest_age) for q in view.queued] == [
        ("s1", "s2", 9, (("E15", 7), ("E41", 2)), 50.0), ("s3", "s2", 1, (("prestage", 1),), 1.0)]
    assert view.queued_total == 10
    assert [q.source for q in jobs_view(FACTS, NOW, system="s3").queued] == ["s3"]


def test_per_worker_summary() -> None:
    view = jobs_view(FACTS, NOW)
    assert [(w.name, w.running, w.concurrency, w.alive) for w in view.workers] == [
        ("h1:1", 1, 4, True), ("h2:2", 0, 4, False), ("h3:3", 0, 4, True)]
    assert view.workers[0].text == "last seen 0.4 s ago"
    assert view.workers[1].text == "lease expired: last seen 31 s ago (dead after 30 s)"
    assert view.summary == ("1 running, 3 lease expired, 1 finished, to be recorded, "
                            "10 queued, 3 workers (1 dead)")


def test_filters_keep_the_shown_mailboxes_jobs_and_every_worker() -> None:
    view = jobs_view(FACTS, NOW, addresses={"a@x"})
    assert [j.address for j in view.jobs] == ["a@x"] and len(view.workers) == 3
    assert jobs_view(FACTS, NOW, system="s9").jobs == ()
    assert jobs_view(FACTS, NOW).of("b@x")[0].step == "E41"


def test_status_text_and_json_lines() -> None:
    view = jobs_view(FACTS, NOW)
    lines = jobs_table(view)
    assert lines[1] == f"Data jobs on workers: {view.summary}"
    header = lines[2].split()
    assert header == ["ADDRESS", "STEP", "WORKER", "SINCE", "HEARTBEAT", "ATTEMPTS", "STATE"]
    row = next(line for line in lines if line.lstrip().startswith("a@x"))
    assert "h1:1" in row and "2026-12-04T21:59:48Z (12 s)" in row and row.endswith("running")
    assert "0.4 s ago" in row
    expired = next(line for line in lines if line.lstrip().startswith("b@x"))
    assert expired.endswith(f"{EXPIRED} (h2:2 last seen 31 s ago)")
    assert "  queued s1 -> s2: 9 (E15 7, E41 2; the oldest waiting 50 s)" in lines
    assert lines[lines.index("Workers:") + 1].split() == [
        "WORKER", "HOST", "PID", "JOBS", "SINCE", "LAST", "SEEN"]
    records = jobs_records(view)
    assert [r["type"] for r in records] == ["job"] * 5 + ["queued"] * 2 + ["worker"] * 3
    assert records[3] == {
        "type": "job", "address": "a@x", "step": "E15", "what": "E15 copy + verification",
        "state": "running", "worker": "h1:1", "since": "2026-12-04T21:59:48Z",
        "seconds": 12.0, "heartbeat_age": 0.4, "attempts": 1, "source": "s1",
        "target": "s2", "text": "running on h1:1 for 12 s, heartbeat 0.4 s ago, attempt 1"}
    assert records[-3]["name"] == "h1:1" and records[-3]["running"] == 1
    assert records[-2]["alive"] is False


def test_no_workers_no_section() -> None:
    """SQLite, or no worker ever started: nothing to print, nothing in JSON."""
    view = jobs_view(JobFacts(), NOW)
    assert view == JobsView() and view.empty
    assert jobs_table(view) == [] and jobs_records(view) == []


def test_a_mailboxs_row_names_its_job() -> None:
    """The status table's NEXT says where the step runs; a row without a job is as before."""
    def row(address: str) -> StatusRow:
        return StatusRow(address, "wave", "s1", "s2", "7", "step", "E15", "due now", "")
    view = jobs_view(FACTS, NOW)
    lines = table([row("a@x"), row("b@x"), row("z@x")], view)
    assert "E15 (running on h1:1)" in lines[1] and "E15 (lease expired)" in lines[2]
    assert lines[3].split()[6:8] == ["E15", "due"]
    assert table([row("z@x")], view) == table([row("z@x")])
