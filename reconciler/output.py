"""How plans and apply results look: Terraform-like text for people, JSON Lines for machines.

The text form prints one line per mailbox with a symbol (`+` create, `~` migrating, `-`
destructive, `!` failed or refused, `=` in sync when `--verbose`, `?` unmanaged: on a system
but in no spec, never touched, `>` a manual step: a person must do what mailferry cannot, and
the steps after it wait), the state and the next
patent step with when it is due, then the frozen summary line (`Plan.summary`).

The JSON Lines form is versioned (`{"type": "version", "format": "mailferry.plan/v1"}` first)
and has one object per change and a final summary object; tools may rely on these fields.
`docs/gitops.md` documents every line type (version, change, warning, applied, error,
blocked, summary) and the stability rule: within v1, lines and fields are only ever added,
so a consumer must ignore types and fields it does not know; a removal or a change of
meaning would be `mailferry.plan/v2`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from json.encoder import encode_basestring_ascii

from mailferry.mail.addresses import readable
from reconciler.engine import StepRecord
from reconciler.plan import Change, Plan, Unmanaged

FORMAT_VERSION = "mailferry.plan/v1"
COLORS = {"+": "\033[32m", "~": "\033[33m", "-": "\033[31m", "!": "\033[31;1m", "=": "\033[2m",
          "?": "\033[36m", ">": "\033[35;1m"}
RESET = "\033[0m"


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")


def symbol(change: Change) -> str:
    if change.action in ("failed", "conflict", "orphan", "refused"):
        return "!"
    if change.action == "manual":
        return ">"
    if change.destructive:
        return "-"
    if change.action == "create":
        return "+"
    if change.action == "in-sync":
        return "="
    return "~"


def when(change: Change, now: datetime) -> str:
    if change.action in ("in-sync", "failed", "conflict", "orphan", "suspended", "refused"):
        return ""
    if change.due is None:
        return "waiting"
    if change.action == "manual":
        return f"recheck {'now' if change.due <= now else iso(change.due)}"
    if change.due <= now:
        return "due now"
    return f"due {iso(change.due)}"


def change_line(change: Change, now: datetime, *, color: bool) -> str:
    mark = symbol(change)
    route = (f"{change.source or '(new)'} -> {change.target}"
             if change.target and change.source != change.target else (change.source or ""))
    state = "" if change.state is None else f"state {change.state}"
    if change.action in ("failed", "conflict", "orphan", "refused"):
        nxt = f"{change.action} at {change.step or '-'}: {change.reason}"
        if change.destructive:
            nxt += " [destructive]"
    elif change.action == "suspended":
        nxt = f"suspended at {change.step or '-'}: {change.reason}"
    elif change.action == "manual":
        nxt = f"manual step before {change.step or '-'}: {change.reason}"
    elif change.action == "in-sync":
        nxt = "in sync" + (f" ({change.reason})" if change.reason else "")
    else:
        nxt = (change.title if change.step == "create"
               else f"next {change.step}: {change.title}")
        if change.destructive:
            nxt += " [destructive]"
        if change.reason:
            nxt += f" ({change.reason})"
    if change.refused:
        nxt += f" [{change.refused}]"
    who = readable(change.address)  # U-labels for a person; the JSON keeps the key
    text = f"  {mark} {who:<32} {route:<14} {state:<9} {nxt}  {when(change, now)}"
    text = text.rstrip()
    return f"{COLORS[mark]}{text}{RESET}" if color else text


def unmanaged_line(box: Unmanaged, *, color: bool) -> str:
    """`?`: a mailbox on a system that no spec names (mailferry leaves it alone)."""
    first, *more = box.addresses
    also = f" (also {', '.join(more)})" if more else ""
    text = f"  ? {first:<32} {box.system:<14} {'':<9} unmanaged: in no spec, left alone{also}"
    return f"{COLORS['?']}{text}{RESET}" if color else text


def print_plan(plan: Plan, echo: Callable[[str], None], *, color: bool, verbose: bool,
               header: str) -> None:
    echo(header)
    shown = 0
    for change in plan.changes:
        if change.action == "in-sync" and not verbose:
            continue
        echo(change_line(change, plan.at, color=color))
        shown += 1
    for box in plan.unmanaged:
        echo(unmanaged_line(box, color=color))
    if shown == 0:
        echo("  No changes: every mailbox is where the specs want it.")
    for warning in plan.warnings:
        echo(f"  warning: {warning}")
    echo("")
    echo(plan.summary())


def change_json(change: Change, now: datetime,
                times: dict[datetime | None, str | None] | None = None) -> dict[str, object]:
    """One change as JSON; `times` caches the ISO texts of due times across calls."""
    if times is None:
        due = iso(change.due)
    else:
        due = times.get(change.due, "")
        if due == "":
            due = times[change.due] = iso(change.due)
    return {
        "type": "change", "address": change.address, "action": change.action,
        "symbol": symbol(change), "source": change.source, "target": change.target,
        "state": change.state, "step": change.step, "title": change.title,
        "due": due, "due_now": change.due_at(now),
        "destructive": change.destructive, "reason": change.reason,
        "migration_id": change.migration_id, "placement": change.placement,
        "refused": change.refused or None,
        "manual": change.reason if change.action == "manual" else None,
    }


def version_json(mode: str, at: datetime, *, commit: str | None, dirty: bool = False,
                 digest: str = "") -> str:
    """The first line of every stream: format, mode (plan, apply, watch), specs provenance."""
    return json.dumps({"type": "version", "format": FORMAT_VERSION, "mode": mode, "at": iso(at),
                       "specs_commit": commit, "specs_dirty": dirty,
                       "specs_digest": digest or None})


def summary_json(plan: Plan, **extra: object) -> dict[str, object]:
    """The summary object (the plan's figures, plus apply's when given)."""
    counts = plan.counts()
    return {
        "type": "summary", "mailboxes": len(plan.changes), "due_now": counts["due now"],
        "waiting": counts["waiting"], "failed": counts["failed"], "in_sync": counts["in sync"],
        "destructive": counts["destructive"], "pending": plan.pending,
        "manual": counts["manual"],
        "warnings": len(plan.warnings), "unmanaged": len(plan.unmanaged),
        "text": plan.summary(counts), **extra,
    }


def warning_json(text: str) -> str:
    return json.dumps({"type": "warning", "message": text})


class ChangeLines:
    """`change_json` lines exactly as `json.dumps` writes them, 100,000 at a time.

    Why not `json.dumps(change_json(c))` per change: that builds and encodes 17 fields for
    every mailbox, while all but two of them (address, migration id) repeat across a plan --
    its changes share a few actions, steps, due times, reasons and placements. So the text
    around those two is encoded once per distinct combination and kept; each line is then
    its address and id between those texts: the same characters (the tests compare them
    with `json.dumps` of `change_json` over every kind of change)."""

    _HEAD = '{"type": "change", "address": '

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.times: dict[datetime | None, str | None] = {}
        self.texts: dict[tuple[object, ...], tuple[str, str]] = {}

    def _around(self, change: Change) -> tuple[str, str]:
        """The text between the address and the id, and the text after the id."""
        fields = change_json(change, self.now, self.times)
        names = list(fields)
        at, mid = names.index("address"), names.index("migration_id")
        texts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items()]
        # (`_HEAD` is texts[:at] and the address's key; change_json puts both fields first)
        between = "".join(f", {t}" for t in texts[at + 1:mid]) + ', "migration_id": '
        return between, "".join(f", {t}" for t in texts[mid + 1:]) + "}"

    def lines(self, changes: list[Change]) -> list[str]:
        texts, head, found = self.texts, self._HEAD, []
        string = encode_basestring_ascii  # what json.dumps writes a str with (ensure_ascii)
        for c in changes:
            key = (c.action, c.source, c.target, c.state, c.step, c.due, c.destructive,
                   c.reason, c.placement, c.refused)
            around = texts.get(key)
            if around is None:
                around = texts[key] = self._around(c)
            number = "null" if c.migration_id is None else int.__repr__(c.migration_id)
            found.append(f"{head}{string(c.address)}{around[0]}{number}{around[1]}")
        return found


def plan_jsonl(plan: Plan, *, commit: str | None, dirty: bool = False,
               digest: str = "") -> list[str]:
    """The whole plan stream: version, one line per change, warnings, summary (last)."""
    lines = [version_json("plan", plan.at, commit=commit, dirty=dirty, digest=digest)]
    lines += ChangeLines(plan.at).lines(plan.changes)
    lines += [json.dumps({"type": "unmanaged", "symbol": "?", "system": b.system,
                          "physical": b.physical, "addresses": list(b.addresses)})
              for b in plan.unmanaged]
    lines += [warning_json(w) for w in plan.warnings]
    lines.append(json.dumps(summary_json(plan)))
    return lines


def record_text(record: StepRecord) -> str:
    if record.ok:
        state = "" if record.to_state is None else f" -> state {record.to_state}"
        return f"  applied {record.step:<8} {record.address}{state} {record.message}".rstrip()
    return f"  error   {record.step:<8} {record.address}: {record.message}"


def record_json(record: StepRecord) -> str:
    return json.dumps({"type": "applied" if record.ok else "error", "address": record.address,
                       "step": record.step, "to_state": record.to_state,
                       "message": record.message, "at": iso(record.at)})


def blocked_text(change: Change) -> str:
    """A change apply did not run because it needs an admin (refused, conflict, failed), or
    waits for a person's manual step."""
    if change.action == "manual":
        return f"  manual  {change.step or '-':<8} {readable(change.address)}: {change.reason}"
    return (f"  blocked {change.step or '-':<8} {readable(change.address)}: {change.action}: "
            f"{change.reason}")


def blocked_json(change: Change, now: datetime) -> str:
    kind = "manual" if change.action == "manual" else "blocked"
    return json.dumps({**change_json(change, now), "type": kind})
