"""The Postfix + Dovecot and generic IMAP drivers give the data mover IMAP access
(`imap_account`), so the engine's copies between them take the pipelined path, against
real servers: a private Postfix + Dovecot (`tests/pfdovecot.py`) and a private Dovecot with a
master user (`tests/dovecot.py`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import select

from reconciler.drivers.base import MailSystemDriver
from reconciler.drivers.imap import ImapDriver
from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver
from reconciler.errors import TemporaryError
from reconciler.mover.dovecot_direct import DovecotDirectEndpoint
from reconciler.mover.endpoints import ImapEndpoint, content_hash
from reconciler.mover.manifest import Manifest
from reconciler.mover.service import endpoint_for, move_mail
from reconciler.spec.model import (
    Endpoint,
    ImapOptions,
    MasterUser,
    PostfixDovecotOptions,
    SecretRef,
)
from reconciler.spec.modes import Modes
from reconciler.state.model import TransferManifest
from reconciler.state.store import Store, default_url

from dovecot import Dovecot, skip_unless_available
from pfdovecot import MAIL_USER, MASTER_USER, MailHost, make_root, missing_prerequisites

pytestmark = pytest.mark.timeout(180)
BOX = "zoe=corp.example"
BACK = "yan=corp.example"


@dataclass
class Systems:
    host: MailHost
    pf: PostfixDovecotDriver
    plain: Dovecot  # users zoe, yan; master user admin
    imap: ImapDriver  # master login on `plain`
    per_user: ImapDriver  # per-user passwords on `plain`
    root: Path


@pytest.fixture(scope="module")
def systems() -> Iterator[Systems]:
    why = missing_prerequisites()
    if why:
        pytest.skip(why)
    skip_unless_available()
    host = MailHost("pfm", make_root("mailferry-pfm-"), fed_port=1)
    root = Path(tempfile.mkdtemp(prefix="mfty-drv-"))
    root.chmod(0o755)
    plain = Dovecot(root, "plain", {"zoe": "pw-zoe", "yan": "pw-yan"},
                    master=("admin", "admin-pw"))
    try:
        host.start()
        plain.start()
        pf = PostfixDovecotDriver("pfm", PostfixDovecotOptions(
            state_dir=str(host.state_dir), postfix_config_dir=str(host.postfix_dir),
            dovecot_config=str(host.dovecot_conf), mail_root=str(host.root / "mail"),
            mail_user=MAIL_USER, smtp=Endpoint("127.0.0.1", host.smtp_port),
            lmtp=Endpoint("127.0.0.1", host.lmtp_port),
            imap=Endpoint("127.0.0.1", host.imap_port),
            master=MasterUser(MASTER_USER, SecretRef(file=str(host.password_file)))),
            Endpoint("127.0.0.1", 1), "pfm.internal", ("corp.example",))
        secret = root / "admin.password"
        secret.write_text("admin-pw\n")
        passwords = root / "passwords"
        passwords.write_text("zoe@corp.example pw-zoe\nyan@corp.example pw-yan\n")
        server = Endpoint("127.0.0.1", plain.port)
        imap = ImapDriver("old", ImapOptions(
            server=server, state_dir=str(root / "old"), tls="none", login="master",
            master=MasterUser("admin", SecretRef(file=str(secret))), login_format="{local}"))
        per_user = ImapDriver("old-pu", ImapOptions(
            server=server, state_dir=str(root / "old-pu"), tls="none", login="per-user",
            passwords=SecretRef(file=str(passwords)), login_format="{local}"))
        yield Systems(host, pf, plain, imap, per_user, root)
    finally:
        host.stop()
        plain.stop()
        shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def contents(driver: MailSystemDriver, box: str) -> Counter[tuple[str, bytes]]:
    """(folder, exact bytes) of every message, read through the driver's own calls."""
    return Counter((folder, driver.read_message(box, folder, m.key))
                   for folder in driver.list_folders(box)
                   for m in driver.list_messages(box, folder))


def rows(st: Store, key: str) -> list[TransferManifest]:
    with st.session() as session:
        return list(session.scalars(select(TransferManifest)
                                    .where(TransferManifest.mailbox == key)))


def test_postfix_dovecot_to_imap_and_back_take_the_pipelined_path(
        systems: Systems, tmp_path: Path) -> None:
    pf, imap = systems.pf, systems.imap
    pf.create_mailbox(BOX, access_addresses=("zoe@corp.example",))
    for n, folder in enumerate(["INBOX", "INBOX", "Sent", "Projects/2026"]):
        data = (f"From: a@x\r\nMessage-ID: <{n}@pfm>\r\nSubject: {n}\r\n\r\n"
                f"body {n}\r\n").encode()
        pf.append_message(BOX, folder, data, flags="S" if n else "", internal_date=1.6e9 + n)
    pf.append_message(BOX, "INBOX", b"From: a@x\r\nSubject: no id\r\n\r\nbare\r\n")
    imap.create_mailbox(BOX, access_addresses=("zoe@corp.example",))
    # both drivers hand the mover an IMAP login: master user on behalf of the mailbox
    src, dst = endpoint_for(pf, BOX, readonly=True), endpoint_for(imap, BOX, readonly=False)
    assert isinstance(src, ImapEndpoint) and isinstance(dst, ImapEndpoint)
    assert (src.account.user, src.account.authorize_as) == (MASTER_USER, BOX)
    assert (dst.account.user, dst.account.authorize_as) == ("admin", "zoe")
    st = Store(default_url(tmp_path / "state.db"))
    report = move_mail(pf, BOX, imap, BOX, key="zoe", modes=Modes(), phase="copy",
                       manifest=Manifest(st))
    assert report.verified and report.copied == 5 and report.error is None
    assert contents(imap, BOX) == contents(pf, BOX)  # byte-identical, folder by folder
    written = rows(st, "zoe")
    # IMAP UIDVALIDITYs on both sides: the pipelined path wrote these rows, not the
    # driver fallback (whose validity is the constant "key")
    assert len(written) == 5 and all(r.copied for r in written)
    assert all((r.src_validity or "").isdigit() and (r.dst_validity or "").isdigit()
               for r in written)
    assert {r.sha256 for r in written} == {content_hash(b) for _, b in contents(pf, BOX)}
    again = move_mail(pf, BOX, imap, BOX, key="zoe", modes=Modes(), phase="copy",
                      manifest=Manifest(st))
    assert again.verified and (again.copied, again.present) == (0, 5)
    # and back, from the generic IMAP driver with per-user passwords into a new PF mailbox
    pf.create_mailbox(BACK, access_addresses=("yan@corp.example",))
    systems.per_user.create_mailbox(BOX, access_addresses=("zoe@corp.example",))
    back_src = endpoint_for(systems.per_user, BOX, readonly=True)
    assert isinstance(back_src, ImapEndpoint)
    assert (back_src.account.user, back_src.account.authorize_as) == ("zoe", None)
    back = move_mail(systems.per_user, BOX, pf, BACK, key="back", modes=Modes(), phase="copy",
                     manifest=Manifest(st))
    assert back.verified and back.copied == 5
    assert contents(pf, BACK) == contents(pf, BOX)
    assert all((r.src_validity or "").isdigit() for r in rows(st, "back"))


def test_refused_master_password_names_system_server_and_login(
        systems: Systems, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    bad = ImapDriver("old-bad", ImapOptions(
        server=Endpoint("127.0.0.1", systems.plain.port), state_dir=str(tmp_path / "s"),
        tls="none", login="master", master=MasterUser("admin", SecretRef(file=str(wrong))),
        login_format="{local}"))
    systems.pf.create_mailbox(BOX, access_addresses=("zoe@corp.example",))
    report = move_mail(bad, "zoe=corp.example", systems.pf, BOX, key="bad", modes=Modes(),
                       phase="copy", manifest=None)
    assert not report.verified and report.attempts == 1 and report.error is not None
    assert f"old-bad: IMAP 127.0.0.1:{systems.plain.port}" in report.error
    assert "master user 'admin' for 'zoe'" in report.error and "refused" in report.error
    assert "not-the-password" not in report.error
    missing = ImapDriver("old-nosecret", ImapOptions(
        server=Endpoint("127.0.0.1", systems.plain.port), state_dir=str(tmp_path / "t"),
        tls="none", login="master",
        master=MasterUser("admin", SecretRef(file=str(tmp_path / "absent"))),
        login_format="{local}"))
    with pytest.raises(TemporaryError, match=r"old-nosecret: IMAP .*absent"):
        missing.imap_account("zoe=corp.example")


def test_a_postfix_dovecot_target_on_this_machine_gets_big_messages_as_maildir_files(
        systems: Systems, tmp_path: Path) -> None:
    """`directMaildirWrites` on a Postfix + Dovecot system of this machine: the engine's
    copy into it writes a big message as a file of the mailbox's Maildir (the driver names
    Dovecot's configuration, `doveadm` the folder), a small one over IMAP, both proven;
    without it, or as a source, the IMAP endpoint as before."""
    direct = PostfixDovecotDriver("pfd", replace(systems.pf.options, direct_maildir_writes=True),
                                  Endpoint("127.0.0.1", 1), "pfd.internal", ("corp.example",))
    box = "xia=corp.example"
    direct.create_mailbox(box, access_addresses=("xia@corp.example",))
    assert isinstance(endpoint_for(direct, box, readonly=False), DovecotDirectEndpoint)
    assert not isinstance(endpoint_for(direct, box, readonly=True), DovecotDirectEndpoint)
    assert not isinstance(endpoint_for(systems.pf, box, readonly=False), DovecotDirectEndpoint)
    if systems.imap.get_account(BOX) is None:  # made by the first test, unless run alone
        systems.imap.create_mailbox(BOX, access_addresses=("zoe@corp.example",))
    big = b"From: a@x\r\nMessage-ID: <big@pfd>\r\nSubject: big\r\n\r\n" + \
        (b"z" * 78 + b"\r\n") * 30_000  # 2.4 MB: streamed
    systems.imap.append_message(BOX, "Projects/2026", big, flags="S", internal_date=1.7e9)
    st = Store(default_url(tmp_path / "state.db"))
    report = move_mail(systems.imap, BOX, direct, box, key="xia", modes=Modes(),
                       phase="copy", manifest=Manifest(st))
    assert report.verified and report.error is None, report.as_dict()
    assert contents(direct, box) == contents(systems.imap, BOX)
    written = [p for p in (systems.host.root / "mail").rglob("cur/*")
               if "xia" in str(p) and f"P{os.getpid()}Q" in p.name]
    assert len(written) == 1 and written[0].stat().st_size == len(big)
