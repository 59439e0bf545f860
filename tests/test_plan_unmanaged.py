"""The plan's unmanaged mailboxes: on a system (fed's directory), in no spec, never touched."""

from __future__ import annotations

from datetime import UTC, datetime

from reconciler.output import plan_jsonl, print_plan
from reconciler.plan import make_plan
from reconciler.spec.model import DEFAULT_POLICY, DesiredMailbox

NOW = datetime(2026, 12, 3, tzinfo=UTC)


def want(address: str, aliases: tuple[str, ...] = ()) -> DesiredMailbox:
    return DesiredMailbox(address, aliases, "pa", "pa-imported", None, DEFAULT_POLICY, None)


def test_a_mailbox_in_no_spec_is_unmanaged_and_not_pending() -> None:
    directory = {
        "u01@corp.example": "u01=corp.example@pa.invalid",
        "info.u01@corp.example": "u01=corp.example@pa.invalid",
        "u02@corp.example": "u02=corp.example@pa.invalid",
        "info.u02@corp.example": "u02=corp.example@pa.invalid",  # alias before the address
        "b01@corp.example": "b01=corp.example@pb.invalid",
    }
    plan = make_plan({"u01@corp.example": want("u01@corp.example")}, [], directory, NOW)
    assert [(b.system, b.addresses) for b in plan.unmanaged] == [
        ("pa", ("u02@corp.example", "info.u02@corp.example")),
        ("pb", ("b01@corp.example",))]
    assert not plan.pending  # nothing to do about them
    assert [c.address for c in plan.changes] == ["u01@corp.example"]  # its alias: managed
    assert plan.summary().endswith("1 in sync, 0 destructive. 2 unmanaged.")
    lines: list[str] = []
    print_plan(plan, lines.append, color=False, verbose=False, header="")
    assert any(line.startswith("  ? u02@corp.example") and "unmanaged: in no spec" in line
               and "also info.u02@corp.example" in line for line in lines)
    assert '"type": "unmanaged"' in plan_jsonl(plan, commit=None)[-3]
    # everything in a spec: no unmanaged sentence, the summary keeps its frozen shape
    full = make_plan({a: want(a) for a in ("u01@corp.example", "u02@corp.example",
                                           "b01@corp.example")}, [], directory, NOW)
    assert not full.unmanaged and full.summary().endswith("0 destructive.")
