"""Spec loading: the working set in specs/, every class of bad spec, the schemas themselves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from jsonschema import Draft202012Validator

from reconciler.errors import SpecError
from reconciler.spec import loader
from reconciler.spec.durations import format_duration, parse_duration
from reconciler.spec.gitinfo import git_state
from reconciler.spec.loader import SCHEMA_DIR, load_schemas, load_specs
from reconciler.spec.model import DEFAULT_POLICY, DataTransfer, Endpoint
from reconciler.spec.yamlpos import parse_documents

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"

# A minimal valid set; line numbers below are relied upon by the tests.
BASE = """\
apiVersion: mailferry/v1
kind: MailSystem
metadata: {name: s1}
spec:
  driver: maildir
  domains: [corp.example]
  maildir: {root: data/s1, lmtp: 127.0.0.1:2401, submission: 127.0.0.1:2501}
---
apiVersion: mailferry/v1
kind: MailSystem
metadata: {name: s2}
spec:
  driver: maildir
  domains: [corp.example, other.example]
  maildir: {root: /srv/s2, lmtp: 127.0.0.1:2402, submission: 127.0.0.1:2502}
"""
FED = """\
apiVersion: mailferry/v1
kind: FedHub
metadata: {name: fed}
spec:
  smtp: 127.0.0.1:2525
  control: http://127.0.0.1:8025
  token: {env: FED_TOKEN}
  stateDir: fed-state
  domains: [corp.example]
"""


def write_set(root: Path, **files: str) -> Path:
    """Write base.yaml, fed.yaml and the given files (name with '_' for '.') into root."""
    root.mkdir(parents=True, exist_ok=True)
    contents = {"base.yaml": BASE, "fed.yaml": FED}
    contents.update({name.replace("_yaml", ".yaml"): text for name, text in files.items()})
    for name, text in contents.items():
        if text:
            (root / name).write_text(text)
    return root


def problems_of(directory: Path) -> list[str]:
    """The problems the loader reports for `directory` (it must fail)."""
    with pytest.raises(SpecError) as caught:
        load_specs(directory)
    return caught.value.problems


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp folder that is also the working directory, so FILE is just the file name."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the working set -------------------------------------------------------------------------


def test_working_set_loads_with_concrete_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    specs = load_specs("specs")
    assert specs.root == str(SPECS)
    assert sorted(specs.systems) == ["s1", "s2"]
    s1, s2 = specs.systems["s1"], specs.systems["s2"]
    assert s1.driver == "maildir" and s1.domains == ("corp.example",)
    assert s1.internal_domain == "s1.internal" and s2.internal_domain == "s2.internal"
    assert s1.root == str(REPO / "var" / "s1") and s2.root == str(REPO / "var" / "s2")
    assert s1.lmtp == Endpoint("127.0.0.1", 2401) and s2.lmtp == Endpoint("127.0.0.1", 2402)
    assert s1.submission is not None and s2.submission is not None
    assert s1.submission.port == 2501 and s2.submission.port == 2502
    assert s1.location.file == "specs/systems.yaml" and s1.location.line == 4

    fed = specs.fed
    assert fed.name == "fed" and fed.smtp == Endpoint("127.0.0.1", 2525)
    assert fed.control_url == "http://127.0.0.1:8025"
    assert fed.token.env is None and fed.token.file == str(REPO / "var" / "fed.token")
    assert fed.state_dir == str(REPO / "var" / "fed")
    assert fed.domains == ("corp.example",)

    always = specs.windows["always"]
    assert always.time_zone == "UTC" and len(always.rules) == 1
    assert always.rules[0].start == datetime(2026, 1, 1, tzinfo=UTC)
    assert always.rules[0].end == datetime(2030, 1, 1, tzinfo=UTC)
    nights = specs.windows["weeknights"]
    assert nights.time_zone == "Europe/Paris"
    assert [(r.kind, r.schedule, r.duration) for r in nights.rules] == [
        ("allow", "0 20 * * 1-5", timedelta(hours=4)),
        ("deny", "0 0 24 12 *", timedelta(days=2)),
    ]

    policy = specs.policies["default"]
    assert list(specs.policies) == ["default"]  # `careful` is commented out
    assert policy.station_checks is False and policy.data_transfer == "copy"
    assert policy.diary is True and policy.local_station_data is False
    assert policy.delete_source_after == timedelta(0)
    assert policy.prestage_lead == timedelta(0) and policy.recheck_lead == timedelta(0)
    assert policy.max_parallel == 10

    desired = specs.desired()
    assert sorted(desired) == ["alice@corp.example", "bob@corp.example", "carol@corp.example"]
    alice = desired["alice@corp.example"]
    assert alice.system == "s1" and alice.placement == "home"
    assert alice.aliases == ("a.liddell@corp.example",)
    assert alice.window is always and alice.policy is policy
    assert desired["bob@corp.example"].aliases == ()
    carol = desired["carol@corp.example"]
    assert carol.system == "s2" and carol.placement == "wave-1"
    assert carol.aliases == ("c.jones@corp.example",)


def test_minimal_set_defaults_and_resolution(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s2
  mailboxes:
    - {address: Dan@Other.Example, aliases: [D.X@corp.example], station: ws-9}
""")
    specs = load_specs(here)
    assert specs.systems["s1"].root == str(here / "data" / "s1")
    assert specs.systems["s2"].root == "/srv/s2"  # absolute paths stay as written
    assert specs.fed.state_dir == str(here / "fed-state")
    assert specs.fed.token.env == "FED_TOKEN" and specs.fed.token.file is None
    box = specs.desired()["dan@other.example"]
    assert box.aliases == ("d.x@corp.example",) and box.station == "ws-9"
    assert box.window is None and box.policy is DEFAULT_POLICY
    assert specs.placements["p"].mailboxes[0].location is not None
    assert specs.placements["p"].mailboxes[0].location.line == 7
    assert specs.commit is None and specs.dirty is False  # tmp is not a git work tree


def test_naive_window_time_is_in_the_window_zone(here: Path) -> None:
    write_set(here, w_yaml="""\
apiVersion: mailferry/v1
kind: MigrationWindow
metadata: {name: w}
spec:
  timeZone: Europe/Paris
  windows:
    - {kind: allow, start: "2026-07-01T20:00:00", end: 2026-07-02}
    - {kind: deny, start: 2026-07-01T21:00:00+00:00, end: "2026-07-01T22:00:00Z"}
""")
    rules = load_specs(here).windows["w"].rules
    paris = ZoneInfo("Europe/Paris")
    assert rules[0].start == datetime(2026, 7, 1, 20, tzinfo=paris)
    assert rules[0].start is not None and rules[0].start.astimezone(UTC).hour == 18
    assert rules[0].end == datetime(2026, 7, 2, tzinfo=paris)
    assert rules[1].start == datetime(2026, 7, 1, 21, tzinfo=UTC)


def test_policy_fields_and_never(here: Path) -> None:
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: careful}
spec:
  stationChecks: true
  dataTransfer: validate-and-copy
  deleteSource: never
  prestageLead: 1d12h
  retention: 2w
  stationRetries: 0
""")
    policy = load_specs(here).policies["careful"]
    assert policy.station_checks and policy.data_transfer == "validate-and-copy"
    assert policy.delete_source_after is None
    assert policy.prestage_lead == timedelta(days=1, hours=12)
    assert policy.retention == timedelta(weeks=2) and policy.station_retries == 0
    assert policy.recheck_lead == DEFAULT_POLICY.recheck_lead  # absent: model default


def test_system_limits_are_recorded_and_checked_with_file_and_line(here: Path) -> None:
    """`systemLimits`: a valid entry reaches the recorded modes; an unknown system, a
    system given twice, more connections per user than per system and a zero limit are
    each named with file and line."""
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: hosted}
spec:
  systemLimits:
    - {system: s2, connections: 20, connectionsPerUser: 3, bytesPerDay: 2500000000}
""")
    modes = load_specs(here).policies["hosted"].modes()
    assert modes.limits_of("s2") == (20, 3, 2_500_000_000) and modes.limits_of("s1") == (0, 0, 0)
    assert type(modes).from_json(modes.to_json()) == modes
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: hosted}
spec:
  systemLimits:
    - system: gmail
      connections: 15
    - system: s2
      connections: 2
      connectionsPerUser: 3
    - system: s2
      bytesPerDay: 500000000
""")
    found = problems_of(here)
    assert any(p.startswith("pol.yaml:6: spec.systemLimits[0].system: unknown MailSystem "
                            "'gmail'") for p in found), found
    assert "pol.yaml:10: spec.systemLimits[1].connectionsPerUser: 3 connections per user is " \
        "more than the 2 connections the whole system allows" in found, found
    assert any(p.startswith("pol.yaml:11: spec.systemLimits[2].system: limits for 's2' "
                            "given twice: also at pol.yaml:8") for p in found), found
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: hosted}
spec:
  systemLimits: [{system: s2, connections: 0}]
""")
    assert any(p.startswith("pol.yaml:5:") and "connections" in p
               for p in problems_of(here)), problems_of(here)


def test_dotfiles_readme_and_subfolders_are_ignored(here: Path) -> None:
    write_set(here)
    (here / ".draft.yaml").write_text("not: [valid")
    (here / "README.md").write_text("# notes\n")
    (here / "old").mkdir()
    (here / "old" / "x.yaml").write_text("kind: Nonsense\n")
    (here / "more.yml").write_text("# only a comment\n")
    assert sorted(load_specs(here).systems) == ["s1", "s2"]


# -- one test per class of bad spec -------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(here: Path) -> None:
    write_set(here, bad_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: ok}
spec: {maxParallel: 0}
---
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: broken
spec: {}
""")
    problems = problems_of(here)
    assert any(p.startswith("bad.yaml:9: -: YAML syntax:") for p in problems), problems
    # The document before the error is still checked.
    assert any(p.startswith("bad.yaml:4: spec.maxParallel: ") for p in problems), problems


def test_document_not_a_mapping(here: Path) -> None:
    write_set(here, bad_yaml="# a list\n- a\n- b\n")
    assert problems_of(here) == [
        "bad.yaml:2: -: a spec document must be a mapping (apiVersion, kind, metadata, spec),"
        " found a list"
    ]


def test_unknown_field_is_caught_with_a_suggestion(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s1
  mailboxes:
    - address: a@corp.example
      alias: [b@corp.example]
""")
    [problem] = problems_of(here)
    assert problem.startswith(
        "p.yaml:8: spec.mailboxes[0].alias: unknown field 'alias', did you mean 'aliases'?"
    ), problem


def test_schema_violation_deep_path_and_line(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s1
  mailboxes:
    - address: a@corp.example
    - address: b@corp.example
      aliases:
        - b.one@corp.example
        - not an address
""")
    [problem] = problems_of(here)
    assert problem.startswith("p.yaml:11: spec.mailboxes[1].aliases[1]: must be an email"), problem


def test_missing_required_points_at_the_mapping(here: Path) -> None:
    write_set(here, s_yaml="""\
apiVersion: mailferry/v1
kind: MailSystem
metadata: {name: s3}
spec:
  driver: maildir
  maildir:
    root: x
    lmtp: 127.0.0.1:1
""")
    assert sorted(problems_of(here)) == [
        "s.yaml:5: spec.domains: required field missing",
        "s.yaml:7: spec.maildir.submission: required field missing",
    ]


def test_wrong_type_enum_and_duration(here: Path) -> None:
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: x}
spec:
  stationChecks: maybe
  dataTransfer: copyy
  prestageLead: 3 days
  deleteSource: {after: soon}
""")
    problems = problems_of(here)
    assert len(problems) == 4, problems
    assert problems[0] == "pol.yaml:5: spec.stationChecks: 'maybe' is not of type 'boolean'"
    assert problems[1].startswith("pol.yaml:6: spec.dataTransfer: 'copyy' is not one of")
    assert problems[2].startswith("pol.yaml:7: spec.prestageLead: must be a duration")
    assert problems[3].startswith("pol.yaml:8: spec.deleteSource: must be never or {after:")


def test_literal_token_is_refused_and_never_echoed(here: Path) -> None:
    write_set(here, fed_yaml=FED.replace("token: {env: FED_TOKEN}", "token: s3cr3t-value"))
    [problem] = problems_of(here)
    assert problem.startswith("fed.yaml:7: spec.token: must be {env: VARIABLE} or {file: path}")
    assert "s3cr3t" not in problem


def test_bad_metadata_name(here: Path) -> None:
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata:
  name: Wave_1
spec: {}
""")
    [problem] = problems_of(here)
    assert problem.startswith("pol.yaml:4: metadata.name: must be lowercase"), problem


def test_duplicate_key_in_a_mapping(here: Path) -> None:
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: x}
spec:
  diary: true
  diary: false
""")
    assert problems_of(here) == [
        "pol.yaml:6: spec.diary: duplicate key 'diary' (first at line 5)"
    ]


def test_unknown_kind(here: Path) -> None:
    write_set(here, k_yaml="""\
apiVersion: mailferry/v1
kind: MailSytem
metadata: {name: s3}
spec: {}
""")
    [problem] = problems_of(here)
    assert problem.startswith("k.yaml:2: kind: unknown kind 'MailSytem' (expected one of ")


def test_kind_of_the_wrong_type(here: Path) -> None:
    write_set(here, k_yaml="apiVersion: mailferry/v1\nkind: [MailSystem]\n")
    [problem] = problems_of(here)
    assert problem.startswith("k.yaml:2: kind: unknown kind ['MailSystem'] (expected one of ")


def test_unknown_api_version(here: Path) -> None:
    write_set(here, v_yaml="""\
apiVersion: mailferry/v2
kind: MigrationPolicy
metadata: {name: x}
spec: {}
""")
    assert problems_of(here) == [
        "v.yaml:1: apiVersion: unknown apiVersion 'mailferry/v2' (expected mailferry/v1)"
    ]


def test_duplicate_name_names_both_places(here: Path) -> None:
    write_set(here, dup_yaml="""\
apiVersion: mailferry/v1
kind: MailSystem
metadata:
  name: s2
spec:
  driver: maildir
  domains: [corp.example]
  maildir: {root: x, lmtp: 127.0.0.1:1, submission: 127.0.0.1:2}
""")
    assert problems_of(here) == [
        "dup.yaml:4: metadata.name: duplicate MailSystem name 's2': also defined at base.yaml:11"
    ]


def test_same_name_in_different_kinds_is_fine(here: Path) -> None:
    write_set(here, pol_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: s1}
spec: {}
""")
    assert "s1" in load_specs(here).policies


def test_no_fedhub(here: Path) -> None:
    write_set(here, fed_yaml="")
    (here / "fed.yaml").unlink(missing_ok=True)
    assert problems_of(here) == [
        ".:0: -: no FedHub in the spec set (exactly one is required)"
    ]


def test_two_fedhubs(here: Path) -> None:
    write_set(here, fed2_yaml=FED.replace("name: fed", "name: fed2"))
    assert problems_of(here) == [
        "fed2.yaml:1: -: a second FedHub 'fed2': exactly one is allowed, 'fed' is defined at"
        " fed.yaml:1"
    ]


def test_unknown_references(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s9
  window: wave-9
  policy: gentle
  mailboxes: []
""")
    assert problems_of(here) == [
        "p.yaml:5: spec.system: unknown MailSystem 's9' (known: s1, s2)",
        "p.yaml:6: spec.window: unknown MigrationWindow 'wave-9' (known: none)",
        "p.yaml:7: spec.policy: unknown MigrationPolicy 'gentle' (known: none)",
    ]


def test_reference_to_a_broken_object_is_not_also_unknown(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec: {system: s1, policy: pol, mailboxes: []}
---
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: pol}
spec: {maxParallel: many}
""")
    assert problems_of(here) == ["p.yaml:9: spec.maxParallel: 'many' is not of type 'integer'"]


def test_address_claimed_twice_case_insensitive_across_files(here: Path) -> None:
    write_set(here, a_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: a}
spec:
  system: s1
  mailboxes:
    - address: ann@corp.example
      aliases: [team@corp.example]
""", b_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: b}
spec:
  system: s2
  mailboxes:
    - address: bea@corp.example
    - address: Team@Corp.Example
""")
    assert problems_of(here) == [
        "b.yaml:8: spec.mailboxes[1].address: address 'team@corp.example' is claimed twice:"
        " also at a.yaml:8 (spec.mailboxes[0].aliases[0] of placement a)"
    ]


def test_alias_equal_to_own_address_is_claimed_twice(here: Path) -> None:
    write_set(here, a_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: a}
spec:
  system: s1
  mailboxes:
    - {address: ann@corp.example, aliases: [ANN@corp.example]}
""")
    [problem] = problems_of(here)
    assert problem.startswith("a.yaml:7: spec.mailboxes[0].aliases[0]: address 'ann@corp.example'")


def test_absolute_rule_end_not_after_start(here: Path) -> None:
    write_set(here, w_yaml="""\
apiVersion: mailferry/v1
kind: MigrationWindow
metadata: {name: w}
spec:
  windows:
    - kind: allow
      start: 2026-05-02T00:00:00Z
      end: 2026-05-01T00:00:00Z
""")
    assert problems_of(here) == [
        "w.yaml:8: spec.windows[0].end: end 2026-05-01T00:00:00Z is not after start"
        " 2026-05-02T00:00:00Z"
    ]


def test_rule_shapes(here: Path) -> None:
    write_set(here, w_yaml="""\
apiVersion: mailferry/v1
kind: MigrationWindow
metadata: {name: w}
spec:
  windows:
    - kind: allow
      schedule: "0 20 * * *"
    - kind: allow
      duration: 4h
    - kind: deny
      start: 2026-01-01T00:00:00Z
      end: 2026-01-02T00:00:00Z
      schedule: "0 20 * * *"
    - kind: deny
""")
    assert problems_of(here) == [
        "w.yaml:7: spec.windows[0].schedule: schedule without duration: a recurring rule needs"
        " both schedule and duration",
        "w.yaml:9: spec.windows[1].duration: duration without schedule: a recurring rule needs"
        " both schedule and duration",
        "w.yaml:10: spec.windows[2]: a rule is either absolute (start, end) or recurring"
        " (schedule, duration), not both",
        "w.yaml:14: spec.windows[3]: a rule needs start and end, or schedule and duration",
    ]


def test_invalid_cron_and_unknown_time_zone(here: Path) -> None:
    write_set(here, w_yaml="""\
apiVersion: mailferry/v1
kind: MigrationWindow
metadata: {name: w}
spec:
  timeZone: Europe/Parris
  windows:
    - kind: allow
      schedule: "61 20 * * *"
      duration: 1h
""")
    assert problems_of(here) == [
        "w.yaml:5: spec.timeZone: unknown time zone 'Europe/Parris' (expected an IANA name like"
        " Europe/Paris)",
        "w.yaml:8: spec.windows[0].schedule: invalid cron expression '61 20 * * *'",
    ]


def test_domain_not_served_by_target_system(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s1
  mailboxes:
    - address: ok@corp.example
      aliases: [ok@other.example]
""")
    assert problems_of(here) == [
        "p.yaml:8: spec.mailboxes[0].aliases[0]: domain 'other.example' is not served by"
        " MailSystem 's1' (domains: corp.example)"
    ]


def test_bad_port(here: Path) -> None:
    write_set(here, fed_yaml=FED.replace("127.0.0.1:2525", "127.0.0.1:99999"))
    assert problems_of(here) == ["fed.yaml:5: spec.smtp: port 99999 is outside 1-65535"]


def test_all_problems_are_reported_together(here: Path) -> None:
    write_set(here, a_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: a}
spec:
  system: s9
  mailboxes:
    - address: x@corp.example
      aliases: [x@corp.example]
---
apiVersion: mailferry/v1
kind: MigrationWindow
metadata: {name: w}
spec:
  windows:
    - {kind: allow, start: 2026-01-02, end: 2026-01-01}
""", b_yaml="""\
apiVersion: mailferry/v1
kind: MigrationPolicy
metadata: {name: p}
spec:
  dataTransfer: all
  sation: true
""", c_yaml="oops: [\n")
    problems = problems_of(here)
    assert len(problems) == 5, problems
    assert problems[0] == (
        "a.yaml:8: spec.mailboxes[0].aliases[0]: address 'x@corp.example' is claimed twice:"
        " also at a.yaml:7 (spec.mailboxes[0].address of placement a)"
    )
    assert problems[1] == (
        "a.yaml:15: spec.windows[0].end: end 2026-01-01 is not after start 2026-01-02"
    )
    assert problems[2].startswith("b.yaml:5: spec.dataTransfer: 'all' is not one of")
    assert problems[3].startswith("b.yaml:6: spec.sation: unknown field 'sation', did you mean"
                                  " 'stationChecks'?")
    assert problems[4].startswith("c.yaml:2: -: YAML syntax:")
    # s9 is not reported: c.yaml is unreadable and might have defined it.
    assert not any("s9" in p for p in problems)


def test_specs_error_is_a_single_exception_with_lines_in_str(here: Path) -> None:
    write_set(here, fed_yaml=FED.replace("127.0.0.1:2525", "localhost"))
    with pytest.raises(SpecError) as caught:
        load_specs(here)
    assert str(caught.value) == "\n".join(caught.value.problems)
    assert str(caught.value).startswith("fed.yaml:5: spec.smtp: must be host:port")


def test_missing_folder(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path / "nope")
    assert problem.endswith("nope:0: -: specs folder not found")


# -- the schemas ---------------------------------------------------------------------------


SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.schema.json"))


def test_schema_files_are_the_five_kinds() -> None:
    assert SCHEMA_DIR.resolve() == (REPO / "schemas").resolve()  # through mailferry/data
    assert [p.name for p in SCHEMA_FILES] == [
        "fedhub.schema.json",
        "mailboxplacement.schema.json",
        "mailsystem.schema.json",
        "migrationpolicy.schema.json",
        "migrationwindow.schema.json",
    ]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schemas_are_valid_draft_2020_12(path: Path) -> None:
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://mailferry.dev/schemas/{path.name}"
    assert schema["properties"]["apiVersion"]["const"] == "mailferry/v1"
    assert schema["properties"]["kind"]["const"].lower() + ".schema.json" == path.name


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_every_object_is_closed_and_every_field_described(path: Path) -> None:
    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, where
            for name, sub in node.get("properties", {}).items():
                assert sub.get("description"), f"{where}.{name}"
            for key, sub in node.items():
                walk(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(json.loads(path.read_text()), path.name)


def test_loader_uses_the_schema_files() -> None:
    for kind, schema in load_schemas().items():
        path = SCHEMA_DIR / f"{kind.lower()}.schema.json"
        assert schema == json.loads(path.read_text())
    enum = load_schemas()["MigrationPolicy"]["properties"]["spec"]["properties"]["dataTransfer"]
    assert tuple(enum["enum"]) == typing.get_args(DataTransfer)


def test_changing_a_schema_file_changes_validation(
    here: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    schemas = tmp_path_factory.mktemp("schemas")
    for path in SCHEMA_FILES:
        shutil.copy(path, schemas / path.name)
    fed = json.loads((schemas / "fedhub.schema.json").read_text())
    fed["properties"]["spec"]["properties"]["smtp"]["pattern"] = "^nothing-matches$"
    (schemas / "fedhub.schema.json").write_text(json.dumps(fed))
    monkeypatch.setattr(loader, "SCHEMA_DIR", schemas)
    loader.load_schemas.cache_clear()
    loader._validators.cache_clear()
    try:
        write_set(here)
        [problem] = problems_of(here)
        assert problem.startswith("fed.yaml:5: spec.smtp: ")
    finally:
        loader.load_schemas.cache_clear()
        loader._validators.cache_clear()


def test_working_set_documents_validate_against_the_schemas() -> None:
    # What an editor does with schemas/: every document of specs/ is valid on its own.
    count = 0
    for path in sorted(SPECS.glob("*.yaml")):
        for doc in parse_documents(path.read_text()).documents:
            schema = load_schemas()[doc.data["kind"]]
            assert Draft202012Validator(schema).is_valid(doc.data), (path, doc.line)
            count += 1
    assert count == 8


# -- durations and git ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", timedelta(0)), (0, timedelta(0)), ("30s", timedelta(seconds=30)),
     ("1h30m", timedelta(hours=1, minutes=30)), ("7d", timedelta(days=7)),
     ("2w1d", timedelta(days=15)), ("1h1h", timedelta(hours=2))],
)
def test_parse_duration(text: str | int, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "1x", "h", "1.5h", "-1h", 5, True])
def test_parse_duration_rejects(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    assert format_duration(timedelta(hours=1, minutes=30)) == "1h30m"
    assert format_duration(timedelta(0)) == "0s"
    assert format_duration(timedelta(days=8, seconds=5)) == "1w1d5s"
    for text in ["1h30m", "3d", "2w", "45s", "1d2h3m4s"]:
        assert format_duration(parse_duration(text)) == text


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_state_commit_and_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}.items():
        monkeypatch.setenv(key, value)
    repo = tmp_path / "repo"
    specs = write_set(repo / "specs")
    (repo / "other.txt").write_text("x")
    _git(repo, "init", "-q")
    assert git_state(specs) == (None, True)  # no commit yet, untracked specs
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "specs")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(specs) == (head, False)
    (repo / "other.txt").write_text("changed outside the specs folder")
    assert git_state(specs) == (head, False)
    (specs / "fed.yaml").write_text(FED + "# edited\n")
    assert git_state(specs) == (head, True)
    loaded = load_specs(specs)
    assert (loaded.commit, loaded.dirty) == (head, True)
    assert git_state(tmp_path) == (None, False)


# -- hostile input: bounded in memory and time --------------------------------------------------

# 406 bytes (the report's was 666, with longer items): nine levels of nine aliases each are
# 9**9 (387 million) lists once expanded.
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def _run_plan_limited(specs: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`reconcile --plan` in a child with 1 GiB of address space and 60 s: without the
    bounds, the bomb ends in MemoryError (a traceback, not FILE:LINE) or the timeout."""
    import resource
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    return subprocess.run(
        [sys.executable, "-m", "reconciler", "--specs", str(specs), "--plan"],
        cwd=cwd, capture_output=True, text=True, timeout=60, preexec_fn=limit, check=False)


def test_yaml_alias_bomb_is_refused_with_file_and_line(here: Path) -> None:
    assert len(ALIAS_BOMB) < 700
    write_set(here / "specs", bomb_yaml=ALIAS_BOMB)
    done = _run_plan_limited(here / "specs", here)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    bomb = [line for line in done.stderr.splitlines() if line.startswith("specs/bomb.yaml:")]
    assert len(bomb) == 1, done.stderr
    assert re.match(r"specs/bomb\.yaml:\d+: -: YAML aliases expand to more than 10,000 nodes",
                    bomb[0]), bomb


def test_a_few_aliases_still_work(here: Path) -> None:
    write_set(here, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s1
  mailboxes:
    - &ann {address: ann@corp.example, aliases: &al [a.x@corp.example]}
    - {address: bob@corp.example, aliases: *al}
""")
    problems = problems_of(here)  # bob reuses ann's alias: the aliased value was built
    assert any("a.x@corp.example" in p and "also at" in p for p in problems), problems


def test_node_count_of_a_spec_set_is_bounded(here: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.spec import yamlpos

    monkeypatch.setattr(yamlpos, "MAX_NODES", 60)
    boxes = "".join(f"    - {{address: u{i}@corp.example}}\n" for i in range(40))
    write_set(here, p_yaml="apiVersion: mailferry/v1\nkind: MailboxPlacement\n"
              "metadata: {name: p}\nspec:\n  system: s1\n  mailboxes:\n" + boxes)
    problems = problems_of(here)
    over = [p for p in problems if "more than 60 YAML nodes" in p]
    assert len(over) == 1 and over[0].startswith("p.yaml:"), problems


def test_size_of_a_spec_set_is_bounded(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_SPEC_BYTES", 2000)
    write_set(here, z_yaml="# padding\n" * 300)
    problems = problems_of(here)
    assert problems == ["z.yaml:1: -: the spec set is larger than 2,000 bytes; not read further"], \
        problems


# -- international addresses ----------------------------------------------------------------
IDN_SYSTEM = """\
apiVersion: mailferry/v1
kind: MailSystem
metadata: {name: s3}
spec:
  driver: maildir
  domains: [B\u00fccher.example, corp.example]
  maildir: {root: /srv/s3, lmtp: 127.0.0.1:2403, submission: 127.0.0.1:2503}
"""


def test_idn_and_utf8_addresses_load_as_keys(here: Path) -> None:
    write_set(here, s3_yaml=IDN_SYSTEM, p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s3
  reportTo: [Ops@B\u00fccher.example]
  mailboxes:
    - address: J\u00fcrgen@B\u00fccher.example
      aliases: [info@xn--bcher-kva.example, ju\u0308rgen@corp.example]
""")
    specs = load_specs(here)
    assert specs.systems["s3"].domains == ("xn--bcher-kva.example", "corp.example")
    box = specs.placements["p"].mailboxes[0]
    assert box.address == "j\u00fcrgen@xn--bcher-kva.example"
    assert box.aliases == ("info@xn--bcher-kva.example", "j\u00fcrgen@corp.example")  # NFC
    assert specs.placements["p"].report_to == ("ops@xn--bcher-kva.example",)


def test_one_address_in_both_idn_forms_is_claimed_twice_with_file_and_line(here: Path) -> None:
    write_set(here, s3_yaml=IDN_SYSTEM, a_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: a}
spec:
  system: s3
  mailboxes:
    - address: j\u00fcrgen@b\u00fccher.example
""", b_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: b}
spec:
  system: s3
  mailboxes:
    - address: ann@corp.example
      aliases: [J\u00fcrgen@xn--bcher-kva.example]
""")
    assert problems_of(here) == [
        "b.yaml:8: spec.mailboxes[0].aliases[0]: address 'j\u00fcrgen@xn--bcher-kva.example'"
        " is claimed twice: also at a.yaml:7 (spec.mailboxes[0].address of placement a)"
        " (written 'J\u00fcrgen@xn--bcher-kva.example' here, 'j\u00fcrgen@b\u00fccher.example'"
        " there: one domain in its two IDN forms, b\u00fccher.example and xn--bcher-kva.example)"
    ]


def test_bad_idn_is_refused_with_file_and_line(here: Path) -> None:
    write_set(here, s3_yaml=IDN_SYSTEM.replace("corp.example]", "xn--zz.example]"),
              p_yaml="""\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: p}
spec:
  system: s1
  mailboxes:
    - address: x@b\u00fc\u00dfcher\u200d.example
    - address: y@xn--ls8h.example
""")
    problems = problems_of(here)
    assert [p.split(" is not a valid IDN")[0] for p in problems] == [
        "p.yaml:7: spec.mailboxes[0].address: domain 'b\u00fc\u00dfcher\\u200d.example'",  # repr
        "p.yaml:8: spec.mailboxes[1].address: domain 'xn--ls8h.example'",
        "s3.yaml:6: spec.domains[1]: domain 'xn--zz.example'",
    ], problems


LEAN_SCHEMA = """\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: first}
spec:
  system: s1
  mailboxes:
    - address: a@corp.example
      aliases: [a.one@corp.example]
    - address: b@corp.example
      colour: red
    - {address: c@corp.example, aliases: [c.one@corp.example, 7]}
    - address: d@corp.example
      address: d.again@corp.example
    - address: &shared e@corp.example
    - address: *shared
---
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: second}
spec:
  system: s2
  mailboxes:
    - address: g@corp.example
    - address: h@corp.example
      aliases:
        - a.one@corp.example
        - not an address
"""
LEAN_CLAIMS = """\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: first}
spec:
  system: s1
  mailboxes:
    - address: a@corp.example
      aliases: [a.one@corp.example]
    - {address: c@corp.example, aliases: [c.one@corp.example]}
    - address: f@other.example
---
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: second}
spec:
  system: s2
  mailboxes:
    - address: g@corp.example
    - address: h@corp.example
      aliases:
        - h.one@corp.example
        - a.one@corp.example
"""
THIRD = """\
apiVersion: mailferry/v1
kind: MailboxPlacement
metadata: {name: third}
spec:
  system: s1
  mailboxes:
    - address: i@corp.example
    - address: c.one@corp.example
"""


def lean_and_full(here: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The problems of the set in `here` built lean (as always) and fully."""
    lean = problems_of(here)
    with monkeypatch.context() as m:
        m.setattr("reconciler.spec.yamlpos.LEAN", ("no such path",))
        full = problems_of(here)
    return lean, full


def test_mailbox_entries_built_lean_report_every_line_as_a_full_build(
        here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain mailbox entries are built without their inner lines (yamlpos.LEAN); every
    problem inside them must still name the line a full build names, across documents and
    files (a claim first made in another file), and a set that loads asks for none."""
    write_set(here, p_yaml=LEAN_SCHEMA)
    lean, full = lean_and_full(here, monkeypatch)
    assert lean == full
    assert len(lean) == 4, lean  # colour, the 7, the duplicate key, the bad alias
    assert lean[0].startswith("p.yaml:10: spec.mailboxes[1].colour: unknown field 'colour'")
    assert lean[-1].startswith("p.yaml:27: spec.mailboxes[1].aliases[1]: must be an email")

    write_set(here, p_yaml=LEAN_CLAIMS, q_yaml=THIRD)
    lean, full = lean_and_full(here, monkeypatch)
    assert lean == full
    assert [p.split(" (")[0] for p in lean] == [
        "p.yaml:10: spec.mailboxes[2].address: domain 'other.example' is not served by "
        "MailSystem 's1'",
        "p.yaml:22: spec.mailboxes[1].aliases[1]: address 'a.one@corp.example' is claimed "
        "twice: also at p.yaml:8",
        "q.yaml:8: spec.mailboxes[1].address: address 'c.one@corp.example' is claimed twice: "
        "also at p.yaml:9",
    ]

    (here / "p.yaml").unlink()
    (here / "q.yaml").write_text(THIRD)
    [doc] = parse_documents(THIRD).documents
    assert doc.complete is not None  # built lean
    specs = load_specs(here)
    box = specs.placements["third"].mailboxes[1]
    assert box.location is not None and (box.location.file, box.location.line) == ("q.yaml", 8)
