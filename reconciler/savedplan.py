"""Saved plans: apply exactly what was reviewed, or refuse because the world moved on.

Why: in GitOps the reviewed artefact is the plan, not the intent. CI runs
`reconcile --plan --out plan.json` on a pull request, reviewers read it (and see every
destructive step), and after the merge `reconcile --apply plan.json` must do those changes,
no more. Between the two, anything may have happened: another commit touched the specs, a
watch loop moved some migrations on, an admin suspended a placement, someone edited fed's
directory by hand. Applying the old plan then would do something nobody reviewed; Terraform
answers this with "Saved plan is stale", and so do we.

The file (JSON, `mailferry.savedplan/v1`) holds:

- the specs' commit, dirty flag and content digest (`SpecSet.digest`: every spec file's
  name and bytes, so an uncommitted edit counts as much as a new commit);
- a digest of the observed actual state the plan was made from: for every address in the
  plan, fed's directory entry and the newest migration record (id, state, failed,
  suspended, purged), plus the suspended placements; and, for the mailboxes with pending
  changes, those observations in clear, so that a stale plan can say *which* mailbox moved;
- the changes, in the plan's JSON Lines objects (`output.change_json`).

`--apply FILE` loads the specs and observes the world again, recomputes both digests and
refuses with `stale plan: ...` if either differs. Otherwise it runs the changes that were
due in the saved plan, once each, in one pass: the next step of each mailbox as reviewed,
not the chain of steps a normal `--apply` would run. A change that was due then but is not
now (its window closed meanwhile) is skipped and said so; a change that became due since
was not reviewed and waits for the next plan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import MailferryError
from reconciler.output import change_json, iso
from reconciler.plan import Change, MigrationView, Plan
from reconciler.spec.model import SpecSet

SAVED_FORMAT = "mailferry.savedplan/v1"
SHOWN = 5  # differences named in a stale-plan message


class StalePlan(MailferryError):
    """The saved plan no longer matches the specs or the actual state."""


def observation(address: str, directory: dict[str, str],
                latest: dict[str, MigrationView]) -> list[Any]:
    """What the plan saw of one address: [physical, migration id, state, failed, suspended,
    purged] (None for what does not exist)."""
    m = latest.get(address)
    if m is None:
        return [directory.get(address), None, None, None, None, None]
    return [directory.get(address), m.id, m.state, m.failed_reason is not None, m.suspended,
            m.purged]


def observations(plan: Plan, migrations: list[MigrationView], directory: dict[str, str]
                 ) -> dict[str, list[Any]]:
    """address -> observation, for every address of the plan."""
    latest = {m.address: m for m in migrations}  # oldest first: the newest wins
    return {c.address: observation(c.address, directory, latest) for c in plan.changes}


def state_digest(seen: dict[str, list[Any]], suspended: frozenset[str]) -> str:
    """sha256 over the observations (sorted) and the suspended placements."""
    h = hashlib.sha256()
    for address in sorted(seen):
        h.update(json.dumps([address, *seen[address]], separators=(",", ":")).encode())
        h.update(b"\n")
    h.update(json.dumps(sorted(suspended)).encode())
    return h.hexdigest()


def save(path: str | Path, plan: Plan, specs: SpecSet, migrations: list[MigrationView],
         directory: dict[str, str], suspended: frozenset[str]) -> dict[str, Any]:
    """Write the saved plan file; return its content."""
    seen = observations(plan, migrations, directory)
    pending = {c.address for c in plan.changes if c.action != "in-sync"}
    content: dict[str, Any] = {
        "format": SAVED_FORMAT,
        "at": iso(plan.at),
        "specs": {"root": specs.root, "commit": specs.commit, "dirty": specs.dirty,
                  "digest": specs.digest},
        "state_digest": state_digest(seen, suspended),
        "suspended": sorted(suspended),
        "observed": {a: seen[a] for a in sorted(pending)},
        "changes": [change_json(c, plan.at) for c in plan.changes if c.action != "in-sync"],
        "summary": plan.summary(),
    }
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    tmp.replace(target)
    return content


@dataclass(frozen=True)
class SavedPlan:
    """A saved plan as read back."""

    path: str
    content: dict[str, Any]

    @property
    def due(self) -> list[dict[str, Any]]:
        """The changes that were due when the plan was made: what apply runs."""
        return [c for c in self.content["changes"] if c.get("due_now")]


def load(path: str | Path) -> SavedPlan:
    """Read a saved plan; MailferryError when it is not one."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MailferryError(f"cannot read saved plan {path}: {exc}") from exc
    if not isinstance(content, dict) or content.get("format") != SAVED_FORMAT:
        raise MailferryError(f"{path} is not a saved plan ({SAVED_FORMAT}); "
                             "write one with reconcile --plan --out FILE")
    return SavedPlan(str(path), content)


def check(saved: SavedPlan, specs: SpecSet, plan: Plan, migrations: list[MigrationView],
          directory: dict[str, str], suspended: frozenset[str]) -> None:
    """Raise StalePlan naming what changed since the plan was saved."""
    was = saved.content["specs"]
    if was["digest"] != specs.digest:
        commits = (f" (commit {str(was['commit'])[:10]} -> {str(specs.commit)[:10]})"
                   if was["commit"] != specs.commit else " (uncommitted edits)")
        raise StalePlan(f"stale plan: the specs changed since {saved.path} was made{commits}; "
                        "make and review a new plan")
    seen = observations(plan, migrations, directory)
    if state_digest(seen, suspended) == saved.content["state_digest"]:
        return
    diffs: list[str] = []
    if sorted(suspended) != saved.content.get("suspended", []):
        diffs.append(f"suspended placements {saved.content.get('suspended')} -> "
                     f"{sorted(suspended)}")
    old: dict[str, list[Any]] = saved.content["observed"]
    for address in sorted(set(old) | {a for a in seen if a not in old}):
        now = seen.get(address)
        if address in old and now != old[address]:
            diffs.append(f"{address}: {_describe(old[address])} -> {_describe(now)}")
        elif address not in old and address in seen and _pending(plan, address):
            diffs.append(f"{address}: now has a pending change")
    if not diffs:
        diffs.append("mailboxes that were in sync changed (directory or records)")
    more = f" (and {len(diffs) - SHOWN} more)" if len(diffs) > SHOWN else ""
    raise StalePlan(f"stale plan: the actual state changed since {saved.path} was made: "
                    + "; ".join(diffs[:SHOWN]) + more + "; make and review a new plan")


def _pending(plan: Plan, address: str) -> bool:
    return any(c.address == address and c.action != "in-sync" for c in plan.changes)


def _describe(seen: list[Any] | None) -> str:
    if seen is None:
        return "absent"
    physical, mid, state, failed, suspended, _purged = seen
    if mid is None:
        return f"at {physical or 'nowhere'}, no migration"
    flags = " failed" if failed else (" suspended" if suspended else "")
    return f"migration {mid} state {state}{flags}"


def to_apply(saved: SavedPlan, plan: Plan) -> tuple[list[Change], list[str]]:
    """(the current changes matching the saved due ones and still due, skipped notes)."""
    by_address = {c.address: c for c in plan.changes}
    run: list[Change] = []
    skipped: list[str] = []
    for old in saved.due:
        now = by_address.get(old["address"])
        if now is None or (now.action, now.step, now.state, now.target) != (
                old["action"], old["step"], old["state"], old["target"]):
            skipped.append(f"{old['address']}: the change differs now; not applied")
            continue
        if not now.due_at(plan.at):
            skipped.append(f"{old['address']} {old['step']}: no longer due "
                           f"({now.reason or 'waiting'}); not applied")
            continue
        run.append(now)
    return run, skipped

