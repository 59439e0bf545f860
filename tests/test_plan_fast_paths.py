"""The short ways the plan takes at 100,000 mailboxes (issue 22) give the long ways' answers.

`bench/plan_scale.py` measures them; here each is compared with what it replaced, on the
inputs where they could part: the JSON Lines of every kind of change (against
`json.dumps(change_json(...))`, character for character), the keys of ASCII addresses, and
the spec checks that a set claiming every address once skips address by address, and
the unmanaged mailboxes found by set operations instead of a walk of fed's directory.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import get_args

import pytest

from mailferry.mail import addresses
from mailferry.mail.addresses import mailbox_id_for, split_physical
from reconciler.output import change_json, plan_jsonl
from reconciler.plan import Action, Change, Plan, Unmanaged, unmanaged
from reconciler.spec.model import DEFAULT_POLICY, DesiredMailbox
from reconciler.state.states import MigrationState

from test_spec_loader import problems_of, write_set

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def every_kind_of_change() -> list[Change]:
    """Changes of every action, with and without each optional field, sharing some texts
    (the lines cache what they share) and not others."""
    changes = []
    dues = (None, NOW, NOW + timedelta(hours=3), NOW - timedelta(seconds=1))
    states: tuple[int | None, ...] = (None, 0, MigrationState.HELD, 13)
    for i, action in enumerate(get_args(Action)):
        for j in range(8):
            changes.append(Change(
                address=("jürgen\"q\"@bücher.example" if j == 5 else f"u{i}.{j}@corp.example"),
                action=action, source=None if j % 3 == 0 else "s1",
                target=None if j == 7 else "s2", state=states[j % 4],
                step=(None, "E9", "create", "E41")[j % 4], due=dues[(i + j) % 4],
                destructive=j % 2 == 1, reason=("", "window w closed", "naïve \\ \"quoted\"",
                                                "\u2028 line")[j % 4],
                migration_id=None if j % 4 == 0 else i * 100 + j, poll=j == 3,
                refused="" if j != 6 else "the specs now want s3: refused",
                placement=None if j == 2 else f"wave-{j % 2}"))
    return changes


def test_plan_lines_are_json_dumps_of_change_json() -> None:
    plan = Plan(at=NOW, changes=every_kind_of_change())
    lines = plan_jsonl(plan, commit="abc", dirty=True, digest="d" * 64)
    expected = [json.dumps(change_json(c, NOW)) for c in plan.changes]
    assert lines[1:1 + len(expected)] == expected
    assert json.loads(lines[0])["type"] == "version"
    assert json.loads(lines[-1])["mailboxes"] == len(expected)


@pytest.mark.parametrize("text", [
    "Jean.Dupont@Corp.EXAMPLE", " <Jean@Corp.Example> ", "<a@b>", "NoDomain", " x@Y ",
    "a@xn--BCHER-kva.example", "<<a@b>>", "",
])
def test_ascii_keys_are_the_long_ways(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ASCII address keyed by the short way (the text unbracketed, lowercased) against
    the steps it stands for: local part lowercased, domain in A-labels."""
    local, at, domain = addresses.unbracket(text).rpartition("@")
    long_way = f"{local.lower()}@{addresses.domain_key(domain)}" if at else domain.lower()
    assert addresses.address_key(text) == long_way
    monkeypatch.setattr(addresses, "_case_sensitive_local", True)  # the short way is off
    kept = f"{local}@{addresses.domain_key(domain)}" if at else domain
    assert addresses.address_key(text) == kept


PLACEMENTS = """\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: fine}
spec:
  system: s1
  mailboxes:
    - address: a@corp.example
      aliases: [a.alias@corp.example]
---
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: elsewhere}
spec:
  system: s1
  mailboxes:
    - address: b@corp.example
    - address: c@corp.example
      aliases: [c.alias@corp.example, c@other.example]
"""


def test_a_placement_of_unique_claims_is_still_checked_for_its_domains(here: Path) -> None:
    """Every address claimed once: placements whose domains are all served are not walked,
    the one with a domain its system does not serve still names that claim's line."""
    write_set(here, p_yaml=PLACEMENTS)
    assert [p.split(" (")[0] for p in problems_of(here)] == [
        "p.yaml:18: spec.mailboxes[1].aliases[1]: domain 'other.example' is not served by "
        "MailSystem 's1'"]
    claimed = PLACEMENTS.replace("b@corp.example", "a.alias@corp.example")
    write_set(here, p_yaml=claimed)
    assert [p.split(": also")[0] for p in problems_of(here)] == [
        "p.yaml:16: spec.mailboxes[0].address: address 'a.alias@corp.example' is claimed "
        "twice",
        "p.yaml:18: spec.mailboxes[1].aliases[1]: domain 'other.example' is not served by "
        "MailSystem 's1' (domains: corp.example)"]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def unmanaged_the_long_way(desired: dict[str, DesiredMailbox], recorded: set[str],
                           directory: dict[str, str]) -> list[Unmanaged]:
    """`plan.unmanaged` as it walked every entry of fed's directory before issue 22."""
    known = set(desired) | recorded
    for w in desired.values():
        known.update(w.aliases)
    managed = {directory[a] for a in known if a in directory}
    groups: dict[str, list[str]] = {}
    for address, physical in directory.items():
        if physical not in managed and address not in known:
            groups.setdefault(physical, []).append(address)
    found = []
    for physical, found_addresses in groups.items():
        where = split_physical(physical)
        if where is not None:
            first = sorted(found_addresses, key=lambda a: (mailbox_id_for(a) != where[1], a))
            found.append(Unmanaged(physical, where[0], tuple(first)))
    return sorted(found, key=lambda b: (b.system, b.addresses[0]))


def test_unmanaged_by_set_operations_is_the_walk() -> None:
    """Addresses named by a spec, by an alias, by a migration only, routed to a managed
    mailbox under another name, or to nobody's; physical addresses fed cannot split."""
    desired = {f"d{i}@corp.example": DesiredMailbox(
        f"d{i}@corp.example", (f"d{i}.alias@corp.example",) if i % 2 else (), "s2", "p",
        None, DEFAULT_POLICY, None) for i in range(20)}
    recorded = {f"r{i}@corp.example" for i in range(5)}
    directory = {a: f"{mailbox_id_for(a)}@s1.invalid" for a in [*desired, *recorded]}
    directory.update({f"d{i}.alias@corp.example": directory[f"d{i}@corp.example"]
                      for i in range(1, 20, 2)})
    directory["other.name.d3@corp.example"] = directory["d3@corp.example"]
    directory.update({f"x{i}@corp.example": f"x{i % 3}=corp.example@s{i % 2 + 1}.invalid"
                      for i in range(9)})
    directory["odd@corp.example"] = "no-system@.invalid"
    found = unmanaged(desired, recorded, directory)
    assert found == unmanaged_the_long_way(desired, recorded, directory)
    assert len(found) == 6 and unmanaged(desired, recorded, {}) == []
