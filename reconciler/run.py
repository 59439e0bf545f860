"""Running apply for a person or a CI job: output, the lease, the dirty-specs rule, reports.

Why a module between the CLI and the engine: `--apply`, `--apply FILE` and every pass of
`--watch` do the same things around the engine — print each step as text or JSON Lines,
list what is blocked waiting for an admin, print the summary, write the wave reports of
placements that finished — and the CLI must stay a thin parser of options. The engine
itself stays silent and knows nothing of terminals, files or leases.

`Output` is the one place that decides between text and JSON Lines (`output.py` renders),
so a stream always starts with its version line and ends with its summary line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.engine import ApplyReport, Engine, StepRecord
from reconciler.errors import MailferryError
from reconciler.liveprogress import WaveBars
from reconciler.output import (
    blocked_json,
    blocked_text,
    record_json,
    record_text,
    summary_json,
    version_json,
    warning_json,
)
from reconciler.plan import BLOCKED, Plan
from reconciler.report import write_finished
from reconciler.spec.model import SpecSet

Echo = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Output:
    """Where apply's lines go: text for people or JSON Lines (`--json`) for tools."""

    echo: Echo
    as_json: bool
    notice: Echo = _stderr  # messages for people (lease, reports) go to stderr

    def version(self, mode: str, engine: Engine) -> None:
        if self.as_json:
            specs = engine.specs
            self.echo(version_json(mode, engine.clock(), commit=specs.commit, dirty=specs.dirty,
                                   digest=specs.digest))

    def record(self, record: StepRecord) -> None:
        self.echo(record_json(record) if self.as_json else record_text(record))

    def warning(self, text: str) -> None:
        self.echo(warning_json(text) if self.as_json else f"  warning: {text}")

    def blocked(self, plan: Plan) -> None:
        for change in plan.changes:
            if change.action in BLOCKED or change.action == "manual":
                self.echo(blocked_json(change, plan.at) if self.as_json else blocked_text(change))

    def summary(self, plan: Plan, report: ApplyReport) -> None:
        if self.as_json:
            self.echo(json.dumps(summary_json(plan, applied=report.applied,
                                              errors=len(report.errors),
                                              passes=report.passes)))
            return
        self.echo(f"\nApply: {report.applied} steps applied, {len(report.errors)} errors "
                  f"in {report.passes} {'pass' if report.passes == 1 else 'passes'}.")
        self.echo(plan.summary())


def dirty_refusal(specs: SpecSet, allow_dirty: bool) -> str | None:
    """Why applying these specs is refused (uncommitted changes), or None."""
    if specs.dirty and not allow_dirty:
        return (f"the specs in {specs.root} have uncommitted changes: what would be applied "
                "was not reviewed; commit them, or pass --allow-dirty")
    return None


@dataclass
class Applier:
    """Runs apply passes with output and wave reports (one per CLI run or watch loop)."""

    out: Output
    reports_dir: str | Path
    reported_once: bool = False
    last_summary: str = field(default="")
    bars: WaveBars | None = None  # live bars on a terminal (liveprogress.for_output)

    def apply(self, engine: Engine, *, quiet_when_idle: bool = False) -> tuple[ApplyReport, Plan]:
        """Everything due now; then blocked changes, the summary and the wave reports.

        `quiet_when_idle` (watch): print the summary only when something happened or it
        changed since the last pass."""
        engine.on_record = self.out.record
        report = engine.apply() if self.bars is None else self._with_bars(engine, self.bars)
        plan = engine.plan()
        self.finish(engine, plan, report, quiet_when_idle=quiet_when_idle)
        return report, plan

    def _with_bars(self, engine: Engine, bars: WaveBars) -> ApplyReport:
        """apply, with the waves' and the copies' bars on the screen meanwhile."""
        def record(step: StepRecord) -> None:
            self.out.record(step)
            bars.record(step)

        engine.on_record = record
        engine.progress = bars
        bars.begin(engine.plan())
        try:
            return engine.apply()
        finally:
            bars.end()

    def finish(self, engine: Engine, plan: Plan, report: ApplyReport, *,
               quiet_when_idle: bool = False) -> None:
        """Blocked lines, summary, wave reports."""
        text = plan.summary()
        idle = not report.records and text == self.last_summary
        if not (quiet_when_idle and idle):
            self.out.blocked(plan)
            self.out.summary(plan, report)
        self.last_summary = text
        if report.applied or not self.reported_once:
            try:
                write_finished(engine, plan, self.reports_dir, self.out.notice)
            except (OSError, MailferryError) as exc:
                self.out.notice(f"error: wave report not written: {exc}")
            self.reported_once = True
