"""Run many mailbox copies at once, politely, and survive dropped connections.

Why one event loop and not threads or processes: a mailbox copy spends its life waiting on
two servers; asyncio keeps hundreds of such waits in one thread with no locks, and the
copies of one source share its `Throttle`. `parallel` bounds how many mailboxes run at once
(each holds one connection to its source and one to its target).

A dropped connection, a timeout or a server restart does not fail the run: the mailbox is
retried (bounded attempts, growing pause), and because the copy compares contents and the
manifest remembers what is in the target, the retry resumes where the break happened. A
mailbox that still fails is reported with its error and `verified: False`; the others go on.
The same holds for a killed process: the next run starts from the manifest.

`run_jobs` is what the CLI, the reconciler's transfer steps and the benchmark call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailferry.mail.backoff import backoff
from mailferry.mail.imap.client import ImapError, ImapLoginError, ImapThrottled, ImapTlsError
from reconciler.mover.endpoints import Endpoint
from reconciler.mover.manifest import Manifest, RunFigures
from reconciler.mover.pace import BudgetSpent, Shed, SystemPace
from reconciler.mover.pipeline import MailboxCopy, MailboxReport, Options
from reconciler.mover.progress import Progress
from reconciler.mover.throttle import Throttle, is_throttling

RETRYABLE = (ImapError, OSError, asyncio.TimeoutError, EOFError)
THROTTLED_RETRIES = 30  # throttled attempts of one mailbox before it is left for later


@dataclass
class Job:
    """One mailbox to copy: endpoint factories (a fresh pair per attempt)."""

    key: str
    source: Callable[[], Endpoint]
    target: Callable[[], Endpoint]
    throttle: Throttle | None = None
    options: Options = field(default_factory=Options)


class Refused(Exception):
    """A throttling answer, with the pause its system's pace asks for."""

    def __init__(self, exc: ImapThrottled, pause: float, system: str, *,
                 shed: bool = False) -> None:
        super().__init__(f"{system}: {exc}" if system else str(exc))
        self.pause, self.shed = pause, shed


def _refused(exc: ImapThrottled, endpoints: tuple[Endpoint, ...],
             throttle: Throttle | None) -> Refused:
    """Tell the pace of the system that refused us (the endpoint of that server; else the
    job's throttle, the fleet's pace of its source in a worker); a copy that gave its
    connection back (`Shed`) reconnects as soon as a slot is free."""
    if isinstance(exc, Shed):
        return Refused(exc, 0.0, "", shed=True)
    for endpoint in endpoints:
        pace: SystemPace | None = getattr(endpoint, "pace", None)
        if pace is not None and getattr(endpoint, "server", None) == exc.server:
            return Refused(exc, pace.throttled(str(exc)), pace.system)
    keep_off = throttle.throttled(str(exc)) if throttle is not None else 0.0
    return Refused(exc, max(keep_off, 2.0), "")


async def _attempt(job: Job, manifest: Manifest | None, progress: Progress) -> MailboxReport:
    source, target = job.source(), job.target()
    try:  # the copy opens them (the target only when it must be read: `pipeline.py`)
        return await MailboxCopy(job.key, source, target, manifest=manifest, progress=progress,
                                 throttle=job.throttle, options=job.options).run()
    except ImapThrottled as exc:
        raise _refused(exc, (source, target), job.throttle) from exc
    finally:
        await asyncio.gather(source.close(), target.close(), return_exceptions=True)


class RunLog:
    """The passes' figures of a run, written a few at a time: one commit (an fsync of the
    state store) per mailbox was most of what a no-op re-run of 20 mailboxes cost in a new
    process. Why delaying them is safe: a run record only lets a later pass skip listing an
    unchanged folder (and feeds the plan's estimates); lost by a kill -9, that later pass
    lists the folder and proves it again. The manifest rows, which say what the target
    holds, are never delayed."""

    def __init__(self, manifest: Manifest, every: int = 50, seconds: float = 1.0) -> None:
        self.manifest, self.every, self.seconds = manifest, every, seconds
        self.pending: list[RunFigures] = []
        self.since = time.monotonic()

    def add(self, figures: RunFigures) -> None:
        self.pending.append(figures)
        if len(self.pending) >= self.every or time.monotonic() - self.since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        runs, self.pending, self.since = self.pending, [], time.monotonic()
        self.manifest.record_runs(runs)


async def run_job(job: Job, manifest: Manifest | None, progress: Progress, *,
                  retries: int = 5, pause: float = 0.5, log: RunLog | None = None,
                  throttled_retries: int = THROTTLED_RETRIES) -> MailboxReport:
    """Copy one mailbox, retrying a broken connection up to `retries` times and a
    throttling answer up to `throttled_retries` times (after the pause its system's pace
    asks for); its figures go to `log` when given (written with others), else straight
    into the manifest."""
    started = time.monotonic()
    last: BaseException | None = None
    report = MailboxReport(job.key)
    attempt = refusals = sheds = 0
    for _ in range(retries + throttled_retries + 1002):  # bounded: each branch ends or waits
        attempt += 1
        try:
            report = await _attempt(job, manifest, progress)
            report.attempts = attempt
            report.throttled = refusals
            break
        except Refused as exc:
            # Not the mailbox's failure: the system asked us to slow down. Its pace did;
            # wait as it says and go on from the manifest (not counted as a retry).
            refusals += not exc.shed
            last = exc
            if exc.shed:
                attempt -= 1  # not an attempt of its own: the same one, resumed later
                sheds += 1
                if sheds <= 1000:  # bounded: each one waited for a free slot
                    continue
            if refusals > throttled_retries:
                report = MailboxReport(job.key, error=f"throttled: {exc}", attempts=attempt,
                                       throttled=refusals, retry_in=exc.pause)
                break
            await asyncio.sleep(exc.pause)
            continue
        except BudgetSpent as exc:
            report = MailboxReport(job.key, error=str(exc), attempts=attempt,
                                   throttled=refusals, resume_at=exc.resume_at)
            break
        except (ImapTlsError, ImapLoginError) as exc:
            # Refused credentials, a missing STARTTLS, a bad certificate: no retry helps.
            report = MailboxReport(job.key, error=f"{type(exc).__name__}: {exc}",
                                   attempts=attempt)
            break
        except RETRYABLE as exc:
            last = exc
            if attempt - refusals > retries:
                report = MailboxReport(job.key, error=f"{type(last).__name__}: {last}",
                                       attempts=attempt, throttled=refusals)
                break
            # A throttling answer that is no IMAP one (a driver's): the job's throttle
            # slows down (for every worker, when it is the fleet's) and says how long.
            keep_off = job.throttle.throttled(str(exc)) \
                if job.throttle is not None and is_throttling(str(exc)) else 0.0
            await asyncio.sleep(max(keep_off, backoff(attempt - refusals, pause, 15.0,
                                                      jitter=False)))
    report.seconds = time.monotonic() - started
    if manifest is not None:
        figures = RunFigures(
            mailbox=job.key, phase=job.options.phase, copied=report.copied,
            present=report.present, failed=report.failed, missing=report.missing,
            bytes_copied=report.bytes_copied, messages_total=report.messages_total,
            bytes_total=report.bytes_total, seconds=report.seconds, verified=report.verified,
            report=report.as_dict())
        if log is not None:
            log.add(figures)
        else:
            manifest.record_run(figures)
    progress.mailbox_done(job.key, {k: v for k, v in report.as_dict().items()
                                    if k != "folders"})
    return report


async def run_jobs_async(jobs: Sequence[Job], *, manifest: Manifest | None = None,
                         progress: Progress | None = None, parallel: int = 8,
                         retries: int = 5,
                         throttled_retries: int = THROTTLED_RETRIES) -> list[MailboxReport]:
    """Copy every job, `parallel` at a time; reports in the jobs' order."""
    progress = progress or Progress()
    progress.run_started(len(jobs))
    gate = asyncio.Semaphore(max(1, parallel))
    log = RunLog(manifest) if manifest is not None else None

    async def one(job: Job) -> MailboxReport:
        async with gate:
            return await run_job(job, manifest, progress, retries=retries, log=log,
                                 throttled_retries=throttled_retries)

    try:
        reports = await asyncio.gather(*(one(j) for j in jobs))
    finally:
        if log is not None:
            log.flush()
    progress.run_done()
    return list(reports)


def run_jobs(jobs: Sequence[Job], **kwargs: object) -> list[MailboxReport]:
    """`run_jobs_async` from synchronous code (the reconciler's steps, the CLI)."""
    return asyncio.run(run_jobs_async(jobs, **kwargs))  # type: ignore[arg-type]
