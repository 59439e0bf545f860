"""The mover against real Cyrus IMAP (issue 21), next to real Dovecot, on 127.0.0.1.

What Cyrus brings that Dovecot does not: it rewrites 8-bit header bytes to 'X' on store by
default (`munge8bit: yes`), keeping the length, so a proof by size is a false proof; it
answers a command pipelined behind AUTHENTICATE with BAD and loses the next one; admins log
in on behalf of a user (SASL authorization id); '.' separates folders, all under `INBOX.`;
other users' folders shared by ACL appear in the same LIST.

Every count is exact, by Message-ID, and "byte-identical" means every message fetched back
independently (imaplib, not the mover) and compared with the source's bytes.
"""

from __future__ import annotations

import asyncio
import imaplib
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.progress import Progress
from reconciler.mover.runner import Job, run_jobs_async
from reconciler.spec.modes import Modes
from reconciler.state.store import Store, default_url

import cyrus
import dovecot
from cyrus import Cyrus
from dovecot import Dovecot
from helpers import mail

pytestmark = pytest.mark.timeout(300)
TIMEOUT = 20.0  # the mover's IMAP timeout here: a stall would cost at least this
EIGHT_BIT = 4  # messages with raw UTF-8 in their header, per fill


@dataclass
class Servers:
    dovecot: Dovecot  # master user "admin"
    cyrus: Cyrus  # munge8bit: yes (Cyrus's default)
    faithful: Cyrus  # munge8bit: no
    roots: list[Path]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    dovecot.skip_unless_available()
    cyrus.skip_unless_available()
    roots = [dovecot.private_root(), cyrus.private_root()]
    users = {f"u{i}": f"pw-u{i}" for i in range(8)}
    dv = Dovecot(roots[0], "dv", users, master=("admin", "admin-pw"))
    cy = Cyrus(roots[1], "cy", users)
    faithful = Cyrus(roots[1], "cyf", users, munge8bit=False)
    try:
        dv.start()
        cy.start()
        faithful.start()
        yield Servers(dv, cy, faithful, roots)
    finally:
        for server in (faithful, cy, dv):
            server.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def message(n: int, *, eight_bit: bool) -> bytes:
    name = "J\u00fcrgen M\u00fcller" if eight_bit else "Juergen Mueller"
    subject = "Gr\u00fc\u00dfe" if eight_bit else "Greetings"
    return mail.message(f"{subject} {n}", f"m{n}@cyrus.test", f"body {n} \u00e9t\u00e9",
                        sender=f"{name} <jm@example.org>", to="u@example.org", headers=(
                            "Date: Mon, 1 Jan 2001 10:00:00 +0000", "MIME-Version: 1.0",
                            "Content-Type: text/plain; charset=utf-8",
                            "Content-Transfer-Encoding: 8bit"))


# folder (canonical) -> messages; flags, keywords and old dates on some
FOLDERS = ("INBOX", "Sent", "Archive/2023")


def corpus() -> dict[str, list[tuple[bytes, str]]]:
    result: dict[str, list[tuple[bytes, str]]] = {f: [] for f in FOLDERS}
    for n in range(12):
        folder = FOLDERS[n % 3]
        flags = ["", "(\\Seen)", "(\\Seen \\Flagged $Work)"][n % 3]
        result[folder].append((message(n, eight_bit=n < EIGHT_BIT), flags))
    return result


def native(folder: str, sep: str, prefix: str) -> str:
    return "INBOX" if folder == "INBOX" else prefix + folder.replace("/", sep)


def fill(conn: imaplib.IMAP4, sep: str, prefix: str) -> None:
    for folder, messages in corpus().items():
        box = native(folder, sep, prefix)
        if folder != "INBOX":
            conn.create(f'"{box}"')
        for data, flags in messages:
            typ, _ = conn.append(f'"{box}"', flags or None,
                                 imaplib.Time2Internaldate(978_307_200 + len(data)), data)
            assert typ == "OK"


def contents(conn: imaplib.IMAP4, sep: str, prefix: str) -> Counter[tuple[str, str, bytes]]:
    """(folder, Message-ID, exact bytes) of every message, fetched independently."""
    result: Counter[tuple[str, str, bytes]] = Counter()
    for folder in FOLDERS:
        typ, _ = conn.select(f'"{native(folder, sep, prefix)}"', readonly=True)
        if typ != "OK":
            continue
        typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                body = item[1]
                result[(folder, mail.message_id(body), body)] += 1
    return result


def ids(c: Counter[tuple[str, str, bytes]]) -> Counter[tuple[str, str]]:
    return Counter({(f, m): n for (f, m, _), n in c.items()})


def dovecot_login(server: Dovecot, user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=30)
    conn.login(user, server.users[user])
    return conn


def account(server: Dovecot | Cyrus, user: str) -> ImapAccount:
    """The admin on behalf of `user` (Dovecot master user, Cyrus admin: authorization id)."""
    if isinstance(server, Cyrus):
        admin, password = server.admin
    else:
        assert server.master is not None
        admin, password = server.master
    return ImapAccount("127.0.0.1", server.port, admin, password, authorize_as=user,
                       timeout=TIMEOUT, system=server.name)


def copy(src: Dovecot | Cyrus, dst: Dovecot | Cyrus, user: str, st: Store | None, *,
         options: Options | None = None) -> MailboxReport:
    options = options or Options()
    options.target_name = dst.name

    async def go() -> MailboxReport:
        job = Job(user, lambda: ImapEndpoint(account(src, user), readonly=True),
                  lambda: ImapEndpoint(account(dst, user)), options=options)
        return (await run_jobs_async([job], manifest=Manifest(st) if st else None,
                                     progress=Progress(), retries=1))[0]
    return asyncio.run(go())


def test_cyrus_rewriting_on_store_fails_the_proof_and_names_the_change(
        servers: Servers, tmp_path: Path) -> None:
    """Dovecot -> Cyrus with munge8bit: yes: the copies with 8-bit headers are stored with
    'X' in their place (same size), so they are not proven: the report names the target,
    the count and an example; a re-run copies nothing again and still does not prove it;
    accepting the rewrite in the policy proves them as equivalent, and says so."""
    user = "u0"
    fill(dovecot_login(servers.dovecot, user), "/", "")
    st = Store(default_url(tmp_path / "state.db"))
    report = copy(servers.dovecot, servers.cyrus, user, st)
    assert report.copied == 12 and report.failed == 0 and report.missing == 0
    assert not report.verified and report.altered == EIGHT_BIT
    text = report.alteration()
    assert text.startswith(f"target cy altered {EIGHT_BIT} messages on store: "
                           f"8-bit header bytes replaced")
    assert "JXXrgen MXXller" in text and "munge8bit: no" in text
    assert "8bit-headers-as-x" in text
    # what Cyrus really stored: same Message-IDs, 4 of them with X for the 8-bit bytes
    stored = contents(servers.cyrus.login(user), ".", "INBOX.")
    source = contents(dovecot_login(servers.dovecot, user), "/", "")
    assert ids(stored) == ids(source)
    assert len(set(stored) - set(source)) == EIGHT_BIT
    # a second pass: nothing appended twice, still not a proof (the migration waits)
    again = copy(servers.dovecot, servers.cyrus, user, st)
    assert (again.copied, again.present, again.altered) == (0, 12, EIGHT_BIT)
    assert not again.verified
    assert ids(contents(servers.cyrus.login(user), ".", "INBOX.")) == ids(source)
    # deep: every target message fetched and hashed again: the same verdict
    deep = copy(servers.dovecot, servers.cyrus, user, st, options=Options(verify="deep"))
    assert not deep.verified and deep.altered == EIGHT_BIT and deep.copied == 0
    # the admin accepts the equivalence for this target: proven, and said to be equivalent
    accepted = copy(servers.dovecot, servers.cyrus, user, st,
                    options=Options(accepted=frozenset({"8bit-headers-as-x"})))
    assert accepted.verified and accepted.equivalent == EIGHT_BIT and accepted.altered == 0
    assert accepted.as_dict()["accepted"] == ["8bit-headers-as-x"]
    deep_ok = copy(servers.dovecot, servers.cyrus, user, st,
                   options=Options(verify="deep", accepted=frozenset({"8bit-headers-as-x"})))
    assert deep_ok.verified and deep_ok.equivalent == EIGHT_BIT


def test_cyrus_with_munge8bit_no_is_proven_byte_identical(
        servers: Servers, tmp_path: Path) -> None:
    user = "u1"
    fill(dovecot_login(servers.dovecot, user), "/", "")
    st = Store(default_url(tmp_path / "state.db"))
    report = copy(servers.dovecot, servers.faithful, user, st)
    assert report.verified and report.copied == 12 and report.altered == 0
    assert report.equivalent == 0
    source = contents(dovecot_login(servers.dovecot, user), "/", "")
    assert contents(servers.faithful.login(user), ".", "INBOX.") == source  # byte for byte
    again = copy(servers.dovecot, servers.faithful, user, st)
    assert again.verified and (again.copied, again.present) == (0, 12)


def test_admin_login_to_cyrus_costs_no_timeout(servers: Servers, tmp_path: Path) -> None:
    """Cyrus as the source with an admin (authorization id) login: Cyrus answers BAD to a
    command pipelined behind AUTHENTICATE and never answers the one after it. Nothing is
    pipelined behind a login now: one attempt, no retry after a timeout."""
    user = "u2"
    # its own instance: no earlier test of this process may have taught the mover anything
    # about this server (a new port)
    fresh = Cyrus(servers.roots[1], "cyl", {user: "pw-l"}, munge8bit=False).start()
    try:
        fill(fresh.login(user), ".", "INBOX.")
        started = time.monotonic()
        report = copy(fresh, servers.dovecot, user, Store(default_url(tmp_path / "state.db")))
        elapsed = time.monotonic() - started
    finally:
        fresh.stop()
    assert report.error is None and report.attempts == 1
    assert report.verified and report.copied == 12
    assert elapsed < TIMEOUT  # (a consequence of one attempt without a stall)


def test_cyrus_to_dovecot_8bit_and_namespace_then_back(
        servers: Servers, tmp_path: Path) -> None:
    """Cyrus (8-bit headers kept, '.' separator, INBOX. prefix) -> Dovecot byte-identical,
    folders mapped to Dovecot's '/' names; then Dovecot -> a faithful Cyrus user, folders
    created under INBOX. with '.'; each side counted by Message-ID."""
    user, back = "u3", "u4"
    fill(servers.faithful.login(user), ".", "INBOX.")
    st = Store(default_url(tmp_path / "state.db"))
    report = copy(servers.faithful, servers.dovecot, user, st)
    assert report.verified and report.copied == 12 and report.attempts == 1
    source = contents(servers.faithful.login(user), ".", "INBOX.")
    assert contents(dovecot_login(servers.dovecot, user), "/", "") == source
    conn = servers.faithful.login(back)
    assert conn.list()[1] == [b'(\\HasNoChildren) "." INBOX']
    # Dovecot -> Cyrus: the folders appear as INBOX.Sent, INBOX.Archive.2023
    moved = copy(servers.dovecot, servers.faithful, back, st)
    assert moved.verified and moved.copied == 0  # u4 has nothing on Dovecot
    moved = copy(servers.dovecot, servers.faithful, user, st)
    assert moved.verified and moved.present == 12  # u3 on Cyrus already holds them
    assert moved.attempts == 1


def test_shared_folders_of_other_users_are_not_copied(
        servers: Servers, tmp_path: Path) -> None:
    """Cyrus ACLs: u6 shares a folder with u5 (lr); u5's LIST shows it as user.u6.Shared.
    The mover copies u5's own folders only, never another user's mail into BOX2."""
    owner, reader = "u6", "u5"
    conn = servers.faithful.login(owner)
    conn.create("INBOX.Shared")
    conn.append("INBOX.Shared", None, None, message(99, eight_bit=False))
    typ, _ = conn.setacl("INBOX.Shared", reader, "lr")
    assert typ == "OK"
    mine = servers.faithful.login(reader)
    mine.append("INBOX", None, None, message(98, eight_bit=False))
    listed = b" ".join(mine.list()[1])  # type: ignore[arg-type]  # imaplib's stubs: None|tuple
    assert b"user.u6.Shared" in listed  # the shared folder is in the reader's LIST

    async def folders() -> list[str]:
        endpoint = ImapEndpoint(account(servers.faithful, reader), readonly=True)
        await endpoint.open()
        try:
            return [f.name for f in await endpoint.folders()]
        finally:
            await endpoint.close()
    assert asyncio.run(folders()) == ["INBOX"]  # not "user/u6/Shared"
    report = copy(servers.faithful, servers.dovecot, reader,
                  Store(default_url(tmp_path / "state.db")))
    assert report.verified and report.copied == 1 and report.attempts == 1
    assert [f.folder for f in report.folders] == ["INBOX"]


# -- the reconciler's steps: E15 waits, E41 refuses, until the admin decides ---------------
def test_e41_never_deletes_box1_on_copies_cyrus_altered(
        servers: Servers, tmp_path: Path) -> None:
    """BOX1 in the embedded maildir system, BOX2 on Cyrus (munge8bit: yes) through the
    generic IMAP driver with the Cyrus admin. Before issue 21 the copies' sizes matched
    and E41 deleted BOX1, the only intact copy. Now E15 and E41 wait with the reason (the
    target, the count, an example, the two fixes) until the policy accepts the rewrite."""
    from datetime import UTC, datetime
    from typing import Any, cast

    from sqlalchemy import select

    from reconciler.drivers.imap import ImapDriver
    from reconciler.drivers.maildir import MaildirDriver
    from reconciler.errors import TemporaryError
    from reconciler.spec.model import (
        DesiredMailbox,
        Endpoint,
        ImapOptions,
        MasterUser,
        PolicySpec,
        SecretRef,
    )
    from reconciler.state.model import Migration
    from reconciler.steps.base import PassCache, StepContext
    from reconciler.steps.cleanup import e41_delete_source
    from reconciler.steps.transfer import ALTERED_DELAY, e15_copy_mail

    box = "u7=corp.example"
    s1 = MaildirDriver("s1", tmp_path / "s1", ("127.0.0.1", 1), ("127.0.0.1", 2), "s1.internal")
    s1.create_mailbox(box)
    for n in range(6):
        s1.append_message(box, "INBOX" if n % 2 else "Sent", message(n, eight_bit=n < 2),
                          flags="S", internal_date=978_307_200 + n)
    secret = tmp_path / "cyrus-admin"
    secret.write_text(servers.cyrus.admin[1] + "\n")
    target = ImapDriver("cyrus1", ImapOptions(
        server=Endpoint("127.0.0.1", servers.cyrus.port), state_dir=str(tmp_path / "c1"),
        tls="none", login="master", login_format="{local}",
        master=MasterUser(servers.cyrus.admin[0], SecretRef(file=str(secret)))))
    target.create_mailbox(box, access_addresses=("u7@corp.example",))
    drivers = {"s1": s1, "cyrus1": target}
    store = Store(default_url(tmp_path / "state.db"))

    def run(step: Any, policy: PolicySpec) -> Any:
        with store.session() as session:
            m = session.scalars(select(Migration)).first()
            if m is None:
                m = Migration(address="u7@corp.example", source_system="s1",
                              target_system="cyrus1", source_mailbox=box, target_mailbox=box,
                              placement="p", state=10,
                              modes=Modes(data_transfer="copy", diary=False))
                session.add(m)
                session.flush()
            desired = DesiredMailbox("u7@corp.example", (), "cyrus1", "p", None, policy, None)
            ctx = StepContext(specs=cast(Any, None), fed=cast(Any, None), drivers=drivers,
                              session=session, now=datetime.now(UTC), cache=PassCache(),
                              desired=desired)
            return step(ctx, m)

    strict = PolicySpec("p", delete_consent=True)
    with pytest.raises(TemporaryError) as waited:
        run(e15_copy_mail, strict)
    assert "target cyrus1 altered 2 messages on store: 8-bit header bytes replaced" \
        in str(waited.value)
    assert waited.value.delay == ALTERED_DELAY
    with pytest.raises(TemporaryError) as refused:
        run(e41_delete_source, strict)
    text = str(refused.value)
    assert "refusing to delete BOX1: target cyrus1 altered 2 messages on store" in text
    assert "JXXrgen" in text and "munge8bit: no" in text
    assert "acceptStoreRewrites: [{system: cyrus1, rewrite: 8bit-headers-as-x}]" in text
    assert s1.get_account(box) is not None  # BOX1 kept: the only intact copy
    # nothing was appended twice by the second pass
    assert sum(len(target.list_messages(box, f)) for f in target.list_folders(box)) == 6
    accepting = PolicySpec("p", delete_consent=True,
                           accept_store_rewrites=(("cyrus1", "8bit-headers-as-x"),))
    out = run(e41_delete_source, accepting)
    assert out.to_state == 13 and s1.get_account(box) is None
