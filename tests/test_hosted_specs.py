"""A hosted target without servers: its spec fields and their errors (file:line), fed's
system registry (TLS modes, AUTH only over TLS, the recipient format), the plan's manual
step (its own state, symbol, summary and JSON) and the status page's list of it. The real
servers are in tests/test_hosted_target.py."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fed.routing.directory import Directory, DirectoryError
from fed.routing.shared_db import SharedDB, default_url
from reconciler.drivers.imap import ImapDriver
from reconciler.output import change_line, plan_jsonl, symbol
from reconciler.plan import Change, MigrationView, Plan, make_plan
from reconciler.spec.loader import load_specs
from reconciler.spec.model import DesiredMailbox, PolicySpec
from reconciler.web import views
from reconciler.web.views import FedPanel, Snapshot

from test_spec_loader import problems_of, write_set

HOSTED = """\
apiVersion: mailferry/v1
kind: MailSystem
metadata: {{name: hosted}}
spec:
  driver: imap
  domains: [corp.example]
  imap:
    server: imap.provider.example:993
    login: per-user
    passwords: {{file: imap-passwords}}
    stateDir: hosted-state
    smtp: mx.provider.example:25
{extra}"""


def hosted_set(root: Path, extra: str) -> Path:
    return write_set(root, hosted_yaml=HOSTED.format(extra=extra))


def test_target_fields_load_and_reach_the_delivery_endpoint(tmp_path: Path) -> None:
    specs = load_specs(hosted_set(tmp_path, """\
    smtpTls: starttls
    smtpCaFile: provider-ca.pem
    smtpRecipient: "{local}@corp.onmicrosoft.com"
    smtpAuth: {user: relay@corp.example, password: {file: smtp.pw}}
"""))
    imap = specs.systems["hosted"].imap
    assert imap is not None and imap.smtp_tls == "starttls"
    endpoint = ImapDriver("hosted", imap).delivery_endpoint()
    assert (endpoint.host, endpoint.port, endpoint.protocol, endpoint.tls) == (
        "mx.provider.example", 25, "smtp", "starttls")
    assert endpoint.cafile == str(tmp_path / "provider-ca.pem")
    assert (endpoint.auth_user, endpoint.auth_file) == ("relay@corp.example",
                                                        str(tmp_path / "smtp.pw"))
    assert endpoint.rcpt == "{local}@corp.onmicrosoft.com"
    assert not ImapDriver("hosted", imap).creates_mailboxes


@pytest.mark.parametrize(("extra", "expected"), [
    ("    smtpAuth: {user: r, password: {file: p}}\n",
     "hosted.yaml:13: spec.imap.smtpAuth: needs smtpTls starttls or implicit"),
    ("    smtpTls: starttls\n    smtpAuth: {user: r, password: {env: SMTP_PW}}\n",
     "hosted.yaml:14: spec.imap.smtpAuth.password"),
    ('    smtpRecipient: "{user}@x.example"\n',
     "hosted.yaml:13: spec.imap.smtpRecipient: '{user}@x.example' is not a format"),
    ("    smtpTls: sometimes\n", "hosted.yaml:13: spec.imap.smtpTls"),
])
def test_bad_target_fields_are_refused_at_their_line(tmp_path: Path, extra: str,
                                                     expected: str) -> None:
    found = problems_of(hosted_set(tmp_path, extra))
    assert any(f"/{expected}" in p for p in found), found


def test_smtp_settings_without_smtp_are_refused(tmp_path: Path) -> None:
    text = HOSTED.format(extra="    smtpTls: implicit\n").replace(
        "    smtp: mx.provider.example:25\n", "")
    found = problems_of(write_set(tmp_path, hosted_yaml=text))
    assert any("spec.imap.smtpTls: only with smtp" in p for p in found), found


def test_fed_systems_take_implicit_tls_auth_files_and_a_recipient_format(
        tmp_path: Path) -> None:
    directory = Directory(SharedDB(default_url(str(tmp_path))))
    system = directory.put_system("hosted", "127.0.0.1", 465, "smtp", tls="implicit",
                                  cafile="/ca.pem", auth_user="relay", auth_file="/pw",
                                  rcpt="{address}")
    assert system.recipient("jane=corp.example@hosted.invalid") == "jane@corp.example"
    assert system.recipient("a=b=corp.example@hosted.invalid") == "a=b@corp.example"
    assert directory.system("hosted") == system
    plain = directory.put_system("s1", "127.0.0.1", 25, "smtp")
    assert plain.recipient("jane=corp.example@s1.invalid") == "jane=corp.example@s1.invalid"
    tenant = directory.put_system("t", "127.0.0.1", 25, "smtp",
                                  rcpt="{local}@corp.onmicrosoft.com")
    assert tenant.recipient("jane=corp.example@t.invalid") == "jane@corp.onmicrosoft.com"
    for bad, why in ((dict(tls="none", auth_user="relay", auth_file="/pw"), "cleartext"),
                     (dict(tls="starttls", auth_user="relay"), "go together"),
                     (dict(tls="starttls", auth_user="r", auth_file="pw"), "absolute"),
                     (dict(rcpt="{nope}"), "not an address format"),
                     (dict(tls="sometimes"), "tls must be one of")):
        with pytest.raises(DirectoryError, match=why):
            directory.put_system("x", "127.0.0.1", 25, "smtp", **bad)
    assert directory.system("x") is None


def test_the_plan_shows_a_manual_step_as_its_own_state() -> None:
    now = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)
    task = "provision jane@corp.example on hosted"
    policy = PolicySpec("pol")
    m = MigrationView(id=1, address="jane@corp.example", source_system="pf1",
                      target_system="hosted", state=0, state_since=now, modes=policy.modes(),
                      placement="wave", next_attempt_at=now + timedelta(seconds=30),
                      manual_step=task)
    want = {m.address: DesiredMailbox(address=m.address, aliases=(), system="hosted",
                                      placement="wave", window=None, policy=policy,
                                      station=None)}
    directory = {m.address: "jane=corp.example@pf1.invalid"}
    plan = make_plan(want, [m], directory, now)
    [change] = plan.changes
    assert (change.action, change.step, change.reason, change.poll) == ("manual", "E2", task,
                                                                       True)
    assert symbol(change) == ">" and plan.pending
    assert not plan.due()  # rechecked at next_attempt_at, not before
    assert plan.next_due() == now + timedelta(seconds=30)  # --watch wakes for the recheck
    assert make_plan(want, [m], directory, now + timedelta(seconds=30)).due() != []
    line = change_line(change, now, color=False)
    assert line.startswith("  > jane@corp.example") and f"manual step before E2: {task}" in line
    assert line.endswith("recheck 2026-12-04T19:00:30Z")
    assert plan.summary() == ("Plan: 1 mailboxes, 0 due now, 1 waiting, 0 failed, 0 in sync, "
                              "0 destructive. 1 manual step (a person must act).")
    lines = [json.loads(x) for x in plan_jsonl(plan, commit=None)]
    assert lines[1]["manual"] == task and lines[1]["symbol"] == ">"
    assert lines[-1]["manual"] == 1 and lines[-1]["waiting"] == 1
    # Without the manual step the same migration would be an ordinary wait for E2.
    other = make_plan(want, [replace(m, manual_step=None)], directory, now)
    assert (other.changes[0].action, other.changes[0].step) == ("step", "E2")


def test_the_status_page_lists_a_manual_step_with_what_to_do() -> None:
    now = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)
    task = "provision jane@corp.example on hosted"
    change = Change("jane@corp.example", "manual", "pf1", "hosted", state=0, step="E2",
                    due=now, reason=task, migration_id=1, poll=True, placement="wave")
    snap = Snapshot(at=now, plan=Plan(now, [change]), migrations={}, copies={}, rates=None,
                    placements={}, fed=FedPanel())
    [shown] = views.failures(snap)
    assert (shown.action, shown.step, shown.reason) == ("manual", "E2", task)
    assert "rechecks it every 30 s" in shown.command
