"""How plans and apply results look: Terraform-like text for people, JSON Lines for machines.

The text form prints one line per mailbox with a symbol (`+` create, `~` migrating, `-`
destructive, `!` failed or refused, `=` in sync when `--verbose`), the state and the next
patent step with when it is due, then the frozen summary line (`Plan.summary`).

The JSON Lines form is versioned (`{"type": "version", "format": "mailferry.plan/v1"}` first)
and has one object per change and a final summary object; tools may rely on these fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from reconciler.engine import StepRecord
from reconciler.plan import Change, Plan

FORMAT_VERSION = "mailferry.plan/v1"
COLORS = {"+": "\033[32m", "~": "\033[33m", "-": "\033[31m", "!": "\033[31;1m", "=": "\033[2m"}
RESET = "\033[0m"


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")


def symbol(change: Change) -> str:
    if change.action in ("failed", "conflict", "orphan"):
        return "!"
    if change.destructive:
        return "-"
    if change.action == "create":
        return "+"
    if change.action == "in-sync":
        return "="
    return "~"


def when(change: Change, now: datetime) -> str:
    if change.action in ("in-sync", "failed", "conflict", "orphan", "suspended"):
        return ""
    if change.due is None:
        return "waiting"
    if change.due <= now:
        return "due now"
    return f"due {iso(change.due)}"


def change_line(change: Change, now: datetime, *, color: bool) -> str:
    mark = symbol(change)
    route = (f"{change.source or '(new)'} -> {change.target}"
             if change.target and change.source != change.target else (change.source or ""))
    state = "" if change.state is None else f"state {change.state}"
    if change.action in ("failed", "conflict", "orphan"):
        nxt = f"{change.action} at {change.step or '-'}: {change.reason}"
    elif change.action == "in-sync":
        nxt = "in sync" + (f" ({change.reason})" if change.reason else "")
    else:
        nxt = (change.title if change.step == "create"
               else f"next {change.step}: {change.title}")
        if change.destructive:
            nxt += " [destructive]"
        if change.reason:
            nxt += f" ({change.reason})"
    text = f"  {mark} {change.address:<32} {route:<14} {state:<9} {nxt}  {when(change, now)}"
    text = text.rstrip()
    return f"{COLORS[mark]}{text}{RESET}" if color else text


def print_plan(plan: Plan, echo: Callable[[str], None], *, color: bool, verbose: bool,
               header: str) -> None:
    echo(header)
    shown = 0
    for change in plan.changes:
        if change.action == "in-sync" and not verbose:
            continue
        echo(change_line(change, plan.at, color=color))
        shown += 1
    if shown == 0:
        echo("  No changes: every mailbox is where the specs want it.")
    echo("")
    echo(plan.summary())


def change_json(change: Change, now: datetime) -> dict[str, object]:
    return {
        "type": "change", "address": change.address, "action": change.action,
        "symbol": symbol(change), "source": change.source, "target": change.target,
        "state": change.state, "step": change.step, "title": change.title,
        "due": iso(change.due), "due_now": change.due_at(now),
        "destructive": change.destructive, "reason": change.reason,
        "migration_id": change.migration_id,
    }


def plan_jsonl(plan: Plan, *, commit: str | None) -> list[str]:
    counts = plan.counts()
    lines = [json.dumps({"type": "version", "format": FORMAT_VERSION, "at": iso(plan.at),
                         "specs_commit": commit})]
    lines += [json.dumps(change_json(c, plan.at)) for c in plan.changes]
    lines.append(json.dumps({
        "type": "summary", "mailboxes": len(plan.changes), "due_now": counts["due now"],
        "waiting": counts["waiting"], "failed": counts["failed"], "in_sync": counts["in sync"],
        "destructive": counts["destructive"], "pending": plan.pending,
        "text": plan.summary(),
    }))
    return lines


def record_text(record: StepRecord) -> str:
    if record.ok:
        state = "" if record.to_state is None else f" -> state {record.to_state}"
        return f"  applied {record.step:<8} {record.address}{state} {record.message}".rstrip()
    return f"  error   {record.step:<8} {record.address}: {record.message}"


def record_json(record: StepRecord) -> str:
    return json.dumps({"type": "applied" if record.ok else "error", "address": record.address,
                       "step": record.step, "to_state": record.to_state,
                       "message": record.message})
