"""`reconcile --apply` and `--watch` on a terminal: live bars per wave and per running copy.

Why: a cutover pass over a wave of 500 mailboxes prints a line per step, which scrolls by
faster than anyone reads; the admin wants to see how far each wave is and when the copies
will end. `WaveBars` is the mover's `TerminalProgress` (the running copies, with their bytes,
rates and ETA, fed by the engine's copy steps) plus one bar per wave (placement): its
mailboxes done (state 10 or more, or in place) of its total, with the ETA at the pace this
run has finished mailboxes so far. The step lines keep printing above the bars.

Only on a terminal and without `--json` (`for_output`): elsewhere apply's plain lines (or
JSON Lines) are the whole output, as before.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from reconciler.engine import StepRecord
from reconciler.humanize import human_duration
from reconciler.mover.progress import TerminalProgress
from reconciler.plan import Plan
from reconciler.state.states import MigrationState


def _done(state: int | None, action: str) -> bool:
    return action == "in-sync" or (state is not None and state >= MigrationState.DONE)


class WaveBars(TerminalProgress):
    """Bars per wave and per running copy for one apply pass (begin ... end)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._where: dict[str, str] = {}  # address -> placement
        self._state: dict[str, bool] = {}  # address -> done
        self._totals: Counter[str] = Counter()
        self._done: Counter[str] = Counter()
        self._first: Counter[str] = Counter()
        self._waves: dict[str, Any] = {}
        self._began = time.monotonic()

    def begin(self, plan: Plan) -> None:
        """A pass starts: a bar for every wave with something left to do."""
        self._began = time.monotonic()
        self._where.clear()
        self._state.clear()
        self._totals.clear()
        self._done.clear()
        busy: set[str] = set()
        for change in plan.changes:
            placement = change.placement or "-"
            self._where[change.address] = placement
            done = _done(change.state, change.action)
            self._state[change.address] = done
            self._totals[placement] += 1
            self._done[placement] += done
            if change.due_at(plan.at):
                busy.add(placement)
        self._first = Counter(self._done)
        if not busy:
            return
        self.show()
        for placement in sorted(busy):
            self._waves[placement] = self.bars.add_task(
                f"wave {placement}", total=self._totals[placement],
                completed=self._done[placement], figures=self._figures(placement))

    def record(self, record: StepRecord) -> None:
        """A step was applied: move its wave's bar."""
        placement = self._where.get(record.address)
        if placement is None or not record.ok or record.to_state is None:
            return
        done = record.to_state >= MigrationState.DONE
        if done != self._state.get(record.address, False):
            self._state[record.address] = done
            self._done[placement] += 1 if done else -1
        task = self._waves.get(placement)
        if task is not None:
            self.bars.update(task, completed=self._done[placement],
                             figures=self._figures(placement))

    def run_started(self, mailboxes: int) -> None:
        """The engine copies one mailbox per mover run: they add up over the pass."""
        self.mailboxes_total += mailboxes
        self.start("copies")

    def run_done(self) -> None:
        """One copy ended; the bars stay until the pass ends."""
        self._update_overall()

    def _figures(self, placement: str) -> str:
        total, done = self._totals[placement], self._done[placement]
        gained = done - self._first[placement]
        took = time.monotonic() - self._began
        eta = human_duration(took / gained * (total - done)) if gained > 0 and done < total \
            else ("0s" if done >= total else "-")
        return f"{done}/{total} mailboxes at 10+, ETA {eta}"

    def end(self) -> None:
        """The pass is over: the bars are drawn once more as they end, then leave the screen
        (the summary follows)."""
        if self._running:
            self.bars.refresh()
        for task in self._waves.values():
            self.bars.remove_task(task)
        self._waves.clear()
        if self._overall is not None:
            self.bars.remove_task(self._overall)
            self._overall = None
        self.boxes.clear()
        self.mailboxes_total = 0
        self.stop()


def for_output(as_json: bool) -> WaveBars | None:
    """Live bars when both outputs are a terminal and no JSON was asked for."""
    if as_json or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None
    return WaveBars()
