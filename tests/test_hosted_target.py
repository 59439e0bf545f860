"""Moving into a hosted target mailferry cannot administer, against real servers.

The world: fed and the embedded s1 as processes, a private Postfix + Dovecot `pf1` that
mailferry administers (the source), and `hosted` (`tests/hosted.py`): a provider's Postfix +
Dovecot reached only the way a customer reaches Microsoft 365 -- IMAP with STARTTLS and a
password per mailbox for reading and filling, SMTP with STARTTLS (or implicit TLS) and AUTH
for fed's deliveries, a private CA, mailboxes only its admin creates. What is proved here:

- fed's SMTP client delivers there with STARTTLS and with implicit TLS, verifying the
  certificate with `mailferry.mail.tls`, logging in with AUTH; a wrong password is the
  server's 535, no TLS no password, an unknown CA a failed handshake;
- a move whose target mailbox does not exist yet stops at a manual step of its own
  (`>` in the plan, "provision ADDRESS on hosted", exit 2 from --plan and --apply) and
  nothing after it runs; once the provider's admin provisions it, the move completes while
  mail keeps arriving: every message by Message-ID exactly once where it belongs (lost 0,
  duplicated 0, misplaced 0), and a re-run copies nothing;
- a target mailbox holding mail that is not the source's is refused with the address, the
  step and an example; mail this migration already copied there is not "foreign";
- a new address placed on the hosted system waits for its mailbox the same way;
- the provider refusing fed's AUTH (a rotated password) is deferred and recorded as a
  managed system's refusal, never bounced, and delivered once the password file is right;
- kill -9 of the reconciler after E2 found BOX2 and after E15's copy (before their
  commits): the next run converges, nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import select

from fed.delivery.smtpclient import ClientError, Connection
from reconciler.drivers.base import mailbox_id_for, physical_address
from reconciler.engine import ApplyReport, Engine
from reconciler.mover.manifest import Manifest
from reconciler.mover.service import move_mail
from reconciler.output import plan_jsonl
from reconciler.state.model import Event, Migration, utcnow

from helpers import mail
from helpers.waiting import wait_for
from hosted import HostedHost
from pfdovecot import MailHost, make_root
from pfworld import WHY_NOT, PfWorld
from world import placement, policy, run_cli

pytestmark = pytest.mark.timeout(300)

if WHY_NOT and not os.environ.get("CI"):
    pytest.skip(f"real Postfix + Dovecot unavailable: {WHY_NOT}", allow_module_level=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PfWorld]:
    def hosts(fed_port: int) -> dict[str, MailHost]:
        return {"pf1": MailHost("pf1", make_root("mailferry-pf1-"), fed_port),
                "hosted": HostedHost("hosted", make_root("mailferry-hosted-"), fed_port)}

    built = PfWorld(tmp_path_factory.mktemp("hosted"), hosts=hosts)
    yield built
    built.stop()


def hosted_of(world: PfWorld) -> HostedHost:
    return cast(HostedHost, world.hosts["hosted"])


def state_of(engine: Engine, address: str) -> int | None:
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).first()
        return None if m is None else m.state


def why_waiting(engine: Engine, address: str) -> str:
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        assert m.manual_step == f"provision {address} on hosted"
        return m.last_error or ""


def seed(engine: Engine, address: str) -> list[str]:
    """Old mail in BOX1 on pf1: INBOX twice, Sent once."""
    box, ids = mailbox_id_for(address), []
    for n, folder in enumerate(["INBOX", "INBOX", "Sent"]):
        mid = f"<old{n}.{box}@corp.example>"
        engine.drivers["pf1"].append_message(box, folder, mail.message(
            f"old {n}", mid, sender="x@outside.example", to=address), flags="S",
            internal_date=1_600_000_000.0 + n)
        ids.append(mid)
    return ids


def send(port: int, rcpt: str, mid: str) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("x@outside.example", [rcpt], mail.message("one", mid, to=rcpt))


def deliver(host: HostedHost, *, tls: str, port: int, password_file: Path | None = None,
            cafile: str | None = None, rcpt: str = "") -> dict[str, str]:
    """One message through fed's own SMTP client, with AUTH; rcpt -> reply."""
    async def go() -> dict[str, str]:
        conn = await Connection.open(
            "127.0.0.1", port, False, "fed.test", 10.0, tls=tls,
            cafile=str(host.ca) if cafile is None else (cafile or None),
            auth_user=host.smtp_user, auth_file=str(password_file or host.smtp_password_file))
        try:
            replies = await conn.send("x@outside.example", [rcpt],
                                      mail.message("direct", f"<direct.{tls}@outside.example>",
                                                   to=rcpt))
        finally:
            await conn.quit()
        return {r: str(reply) for r, reply in replies.items()}
    return asyncio.run(go())


def test_fed_delivers_with_starttls_or_implicit_tls_and_auth(world: PfWorld,
                                                             tmp_path: Path) -> None:
    host = hosted_of(world)
    address = "ida@corp.example"
    host.provision(address)
    box = mailbox_id_for(address)
    for tls, port in (("starttls", host.smtp_port), ("implicit", host.smtps_port)):
        replies = deliver(host, tls=tls, port=port, rcpt=address)
        assert replies[address].startswith("250"), replies
    wait_for(lambda: host.message_ids(box) == Counter({"<direct.starttls@outside.example>": 1,
                                                       "<direct.implicit@outside.example>": 1}),
             what="both deliveries in the hosted mailbox")
    # A wrong password: the server's own 535, the password in no message.
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    with pytest.raises(ClientError) as refused:
        deliver(host, tls="starttls", port=host.smtp_port, password_file=wrong, rcpt=address)
    assert refused.value.reply.code == 535 and "not-the-password" not in str(refused.value)
    assert f"AUTH as '{host.smtp_user}' refused" in str(refused.value)
    # No TLS: fed will not send a password in cleartext, nothing is sent at all.
    with pytest.raises(ClientError, match="AUTH needs TLS"):
        deliver(host, tls="none", port=host.smtp_port, rcpt=address)
    # The system's roots do not know the provider's private CA: a failed handshake.
    for tls, port in (("starttls", host.smtp_port), ("implicit", host.smtps_port)):
        with pytest.raises(ClientError, match="certificate verify failed"):
            deliver(host, tls=tls, port=port, cafile="", rcpt=address)
    # An unreadable password file is named, not shown.
    with pytest.raises(ClientError, match=r"SMTP AUTH password file .*: cannot read"):
        deliver(host, tls="implicit", port=host.smtps_port,
                password_file=tmp_path / "missing", rcpt=address)
    assert host.message_ids(box).total() == 2


def test_move_waits_for_provisioning_then_completes_with_mail_flowing(
        world: PfWorld, tmp_path: Path) -> None:
    pf1, host = world.hosts["pf1"], hosted_of(world)
    address, colleague = "jane@corp.example", "bob@corp.example"
    box, bob_box = mailbox_id_for(address), mailbox_id_for(colleague)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource="never", diary=False)
    stay = placement("stay", "pf1", [{"address": colleague}], policy_name="p")
    home = world.write(tmp_path / "v1", [pol, stay, placement(
        "home", "pf1", [{"address": address}], policy_name="p")])
    engine = world.engine(home, state)
    assert not engine.apply().errors
    old_ids = seed(engine, address)
    fed_port = engine.specs.fed.smtp.port

    moved = world.write(tmp_path / "v2", [pol, stay, placement(
        "wave", "hosted", [{"address": address}], policy_name="p")])
    engine = world.engine(moved, state)
    report = engine.apply()
    assert not report.errors, report.errors  # a manual step is no error
    task = f"provision {address} on hosted"
    change = next(c for c in engine.plan().changes if c.address == address)
    assert (change.action, change.state, change.step, change.reason) == ("manual", 0, "E2", task)
    assert engine.plan().summary().endswith(" 1 manual step (a person must act).")
    lines = [json.loads(line) for line in plan_jsonl(engine.plan(), commit=None)]
    found = next(line for line in lines if line.get("address") == address)
    assert (found["action"], found["symbol"], found["manual"]) == ("manual", ">", task)
    assert lines[-1]["manual"] == 1
    # Nothing after it ran: no mailbox registered, fed still routes to BOX1, mail lands there.
    assert engine.drivers["hosted"].get_account(box) is None
    assert engine.fed.lookup(address) == physical_address("pf1", box)
    send(fed_port, address, "<before@outside.example>")
    wait_for(lambda: pf1.message_ids(box)["<before@outside.example>"] == 1, what="BOX1 mail")
    with engine.store.session() as session:
        events = [(e.step, e.to_state) for e in session.scalars(
            select(Event).where(Event.address == address).order_by(Event.id))]
    assert events == [("create", None), ("E1", 0), ("manual", 0)]
    # The CLI says so: the plan's own symbol and exit 2; apply exits 2 and names the task.
    planned = run_cli("--specs", str(moved), "--state", state, "--plan", cwd=tmp_path)
    assert planned.returncode == 2, planned.stdout + planned.stderr
    line = next(x for x in planned.stdout.splitlines() if address in x)
    assert line.startswith(f"  > {address}") and f"manual step before E2: {task}" in line
    applied = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert f"  manual  E2       {address}: {task}" in applied.stdout
    assert state_of(engine, address) == 0
    assert "no password for jane@corp.example in the passwords file" in why_waiting(engine,
                                                                                    address)
    # Its password known, the mailbox still missing: the recheck (30 s later) is refused
    # by the provider's IMAP server, the same manual step.
    host.expect(address)
    engine.clock = lambda: utcnow() + timedelta(minutes=1)
    assert not engine.apply().errors
    assert "login as 'jane@corp.example' refused" in why_waiting(engine, address)
    assert next(c for c in engine.plan().changes if c.address == address).action == "manual"

    # The provider's admin provisions it; the next recheck finds it, mail flowing.
    host.provision(address)
    engine.clock = lambda: utcnow() + timedelta(minutes=2)
    sender = mail.Sender(fed_port, [address, colleague], tag="flow", count=40)
    sender.start()
    engine.register_systems()
    for _ in range(40):  # bounded passes
        engine.apply_pass(ApplyReport())
        if not engine.plan().pending:
            break
    sender.join(60)
    assert not sender.is_alive() and not sender.refused
    assert state_of(engine, address) == 10, engine.plan().changes
    wait_for(lambda: engine.fed.queue().pending == 0, what="fed's queue to drain")
    host.assert_queue_empty()
    pf1.assert_queue_empty()

    expected = [*old_ids, "<before@outside.example>", *sender.acked[address]]
    in_hosted = host.message_ids(box)
    assert len(sender.acked[address]) >= 10
    assert {mid: in_hosted[mid] for mid in expected} == dict.fromkeys(expected, 1), \
        "lost or duplicated in the hosted mailbox"
    assert in_hosted.total() == len(expected)  # nothing misplaced into it
    in_bob = pf1.message_ids(bob_box)
    assert in_bob == Counter(dict.fromkeys(sender.acked[colleague], 1))  # bob's stayed put
    assert not set(pf1.message_ids(box)) - {*expected}  # BOX1 kept only jane's mail
    assert engine.fed.lookup(address) == physical_address("hosted", box)
    assert f"sasl_username={host.smtp_user}" in host.maillog()  # fed logged in with AUTH
    assert "TLS connection established from" in host.maillog()

    # A re-run copies nothing: every message found by the manifest.
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        modes, migration_id = m.modes, m.id
    again = move_mail(engine.drivers["pf1"], box, engine.drivers["hosted"], box,
                      key=address, modes=modes, phase="copy",
                      manifest=Manifest(engine.store, migration_id))
    assert again.verified and again.copied == 0 and again.present == pf1.message_ids(box).total()
    assert not engine.apply().records
    assert host.message_ids(box) == in_hosted


def test_target_holding_foreign_mail_is_refused(world: PfWorld, tmp_path: Path) -> None:
    host = hosted_of(world)
    address = "kim@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource="never", diary=False)
    engine = world.engine(world.write(tmp_path / "v1", [pol, placement(
        "home", "pf1", [{"address": address}], policy_name="p")]), state)
    assert not engine.apply().errors
    old_ids = seed(engine, address)
    host.provision(address)
    hosted = engine.drivers["hosted"]
    # One of kim's own messages, as an earlier partial copy would have left it, and one
    # that is not from pf1 (the provider's welcome mail).
    hosted.append_message(box, "INBOX", engine.drivers["pf1"].read_message(
        box, "INBOX", engine.drivers["pf1"].list_messages(box, "INBOX")[0].key))
    hosted.append_message(box, "INBOX", mail.message("Welcome", "<welcome@provider.example>",
                                                     to=address))
    engine = world.engine(world.write(tmp_path / "v2", [pol, placement(
        "wave", "hosted", [{"address": address}], policy_name="p")]), state)
    report = engine.apply()
    [error] = report.errors
    assert error.address == address and error.step == "E2"
    assert error.message.startswith(f"{address} E2: the mailbox on hosted already holds 1 "
                                    "message that is not from pf1 (e.g. "
                                    "<welcome@provider.example> in INBOX)")
    change = next(c for c in engine.plan().changes if c.address == address)
    assert (change.action, change.step, change.state) == ("failed", "E2", 0)
    # Found and recorded in mailferry's own registry, nothing changed at the provider.
    assert hosted.get_account(box) is not None
    assert host.message_ids(box).total() == 2
    assert engine.fed.lookup(address) == physical_address("pf1", box)
    assert len(old_ids) == 3


def test_new_address_on_the_hosted_system_waits_for_its_mailbox(world: PfWorld,
                                                               tmp_path: Path) -> None:
    host = hosted_of(world)
    address = "newhire@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    specs = world.write(tmp_path / "v1", [policy("p", diary=False), placement(
        "hires", "hosted", [{"address": address}], policy_name="p")])
    engine = world.engine(specs, state)
    assert not engine.apply().errors
    change = next(c for c in engine.plan().changes if c.address == address)
    task = f"provision {address} on hosted"
    assert (change.action, change.step, change.reason) == ("manual", "create", task)
    assert engine.fed.lookup(address) is None and engine.drivers["hosted"].get_account(box) is None
    shown = run_cli("--specs", str(specs), "--state", state, "status", cwd=tmp_path)
    assert f"manual step: {task}" in shown.stdout, shown.stdout + shown.stderr
    host.provision(address)
    engine.clock = lambda: utcnow() + timedelta(minutes=1)
    assert not engine.apply().errors
    assert not engine.plan().pending
    assert engine.fed.lookup(address) == physical_address("hosted", box)
    send(engine.specs.fed.smtp.port, address, "<welcome.aboard@outside.example>")
    wait_for(lambda: host.message_ids(box) == Counter({"<welcome.aboard@outside.example>": 1}),
             what="fed's delivery to the new hosted mailbox")


def test_provider_refusing_feds_login_defers_never_bounces(world: PfWorld,
                                                           tmp_path: Path) -> None:
    """The provider's 535 (a rotated SMTP password) is a managed system's refusal: fed keeps
    the message, says so in its refusals, and delivers it once the password file is right."""
    host = hosted_of(world)
    address = "lee@corp.example"
    box = mailbox_id_for(address)
    host.provision(address)
    engine = world.engine(world.write(tmp_path / "v1", [policy("p", diary=False), placement(
        "hires", "hosted", [{"address": address}], policy_name="p")]),
        f"sqlite:///{tmp_path / 'state.db'}")
    applied = engine.apply()
    assert not applied.errors and not engine.plan().pending, (applied, engine.plan().changes)
    good = host.smtp_password_file.read_text()
    try:
        host.smtp_password_file.write_text("rotated-elsewhere\n")
        engine.fed.refresh_system("hosted")  # fed's pooled, logged-in sessions are retired
        send(engine.specs.fed.smtp.port, address, "<during.rotation@outside.example>")
        physical = physical_address("hosted", box)
        refusal = wait_for(lambda: next((r for r in engine.fed.refusals()
                                         if r.physical == physical), None),
                           what="fed's refusal record for the 535")
        assert "535" in refusal.reply and "rotated-elsewhere" not in refusal.reply
        assert engine.fed.queue().pending >= 1 and host.message_ids(box) == Counter()
    finally:
        host.smtp_password_file.write_text(good)
    # What the admin does after fixing it (`fed queue flush`): retry now, not at the back-off.
    engine.fed._call("POST", "/v1/queue/flush", {})
    wait_for(lambda: host.message_ids(box) == Counter({"<during.rotation@outside.example>": 1}),
             timeout=40, what="the deferred message delivered once the password is right")
    # Delivered, so never shunted nor bounced; and nothing else is left in fed's queue.
    wait_for(lambda: engine.fed.queue().pending == 0, what="fed's queue to drain")


def test_kill_9_at_e2_and_e15_into_the_hosted_target_converges(world: PfWorld,
                                                                tmp_path: Path) -> None:
    """kill -9 of `reconcile --apply` after E2 found and registered BOX2 (before its
    commit), then after E15's copy (before its commit): the next run converges, every
    message once in BOX2, the second E2 finding its own registration."""
    host = hosted_of(world)
    address = "max@corp.example"
    box = mailbox_id_for(address)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    pol = policy("p", deleteSource="never", diary=False)
    engine = world.engine(world.write(tmp_path / "v1", [pol, placement(
        "home", "pf1", [{"address": address}], policy_name="p")]), state)
    assert not engine.apply().errors
    old_ids = seed(engine, address)
    host.provision(address)
    moved = world.write(tmp_path / "v2", [pol, placement(
        "wave", "hosted", [{"address": address}], policy_name="p")])
    for failpoint in ("E2:after-action", "E15:after-action"):
        killed = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path,
                         env={"MAILFERRY_FAILPOINT": failpoint})
        assert killed.returncode == -signal.SIGKILL, (failpoint, killed.stderr)
    assert host.message_ids(box) == Counter(dict.fromkeys(old_ids, 1))  # E15's copy, uncommitted
    again = run_cli("--specs", str(moved), "--state", state, "--apply", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert state_of(engine, address) == 10
    assert host.message_ids(box) == Counter(dict.fromkeys(old_ids, 1))  # nothing twice
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)).one()
        steps = [e.step for e in session.scalars(select(Event).where(
            Event.migration_id == m.id).order_by(Event.id)) if e.to_state != e.from_state]
    assert steps == ["E1", "E2", "E4", "E5-E8", "E9", "E11-E14", "E15", "E40"]
