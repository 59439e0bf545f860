"""The data mover against real Dovecot servers: copy, resume, UIDVALIDITY, odd messages."""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mailferry.mail.imap.client import ImapClient, ImapLoginError
from reconciler.drivers.base import ImapAccount
from reconciler.drivers.maildir import MaildirDriver
from reconciler.mover.endpoints import (
    DriverEndpoint,
    Endpoint,
    ImapEndpoint,
    content_hash,
)
from reconciler.mover.folders import FolderRule
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.runner import Job, run_jobs
from reconciler.state.store import Store, default_url

from dovecot import Dovecot, private_root, skip_unless_available
from helpers import mail
from helpers.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
FRENCH = "Éléments envoyés"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hugo", "ivan", "jack",
         "kate", "liam", "marker", "judy", "mona", "nina", "olga")
Snapshot = Counter[tuple[str, bytes, frozenset[str], str]]


class Pair:
    """A source and a target Dovecot; each test adds its own users."""

    def __init__(self) -> None:
        root = private_root()
        # Every test's user exists from the start: Dovecot's auth process may not notice a
        # passwd-file rewritten within the same second.
        users = {u: f"pw-{u}" for u in USERS}
        self.src = Dovecot(root, "src", users, master=("admin", "admin-pw")).start()
        self.dst = Dovecot(root, "dst", users, separator=".", prefix="INBOX.").start()
        self.root = root

    def user(self, name: str) -> str:
        assert name in USERS
        return name

    def stop(self) -> None:
        self.src.stop()
        self.dst.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    skip_unless_available()
    p = Pair()
    yield p
    p.stop()


def login(server: Dovecot, user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=15)
    conn.login(user, f"pw-{user}")
    return conn


def q(name: str) -> str:
    """An IMAP quoted mailbox name for imaplib (modified UTF-7)."""
    from mailferry.mail.imap.mutf7 import encode
    return '"' + encode(name) + '"'


def message(n: int, *, msgid: str | None = "auto", body: str = "") -> bytes:
    return mail.message(f"n{n}", f"<{n}@x.example>" if msgid == "auto" else msgid,
                        f"body {n} {body}", to=None, auto_id=False)


def fill(server: Dovecot, user: str, folders: dict[str, list[tuple[bytes, str]]]) -> None:
    """Append (message, flags) lists into folders (created), with distinct dates."""
    conn = login(server, user)
    when = 1_600_000_000
    for folder, items in folders.items():
        if folder != "INBOX":
            conn.create(q(folder))
        for data, flags in items:
            when += 3600
            typ, _ = conn.append(q(folder), flags or None, imaplib.Time2Internaldate(when), data)
            assert typ == "OK"
    conn.logout()


def snapshot(server: Dovecot, user: str, *, sep: str = "/", prefix: str = "") -> Snapshot:
    """(canonical folder, bytes, flags, INTERNALDATE) of every message of a user."""
    from mailferry.mail.imap.mutf7 import decode
    conn = login(server, user)
    found: Snapshot = Counter()
    _, boxes = conn.list()
    for line in boxes:
        raw = line.decode() if isinstance(line, bytes) else str(line)
        name = raw.rsplit(f' "{sep}" ', 1)[1].strip('"')
        canonical = decode(name)
        canonical = canonical[len(prefix):] if prefix and canonical.startswith(prefix) \
            else canonical
        canonical = canonical.replace(sep, "/")
        if conn.select(f'"{name}"', readonly=True)[0] != "OK":
            continue  # a \Noselect parent of a hierarchy
        _, data = conn.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
        for item in data:
            if not isinstance(item, tuple):
                continue
            meta = item[0].decode()
            flags = frozenset(f for f in imaplib.ParseFlags(item[0]) if f != b"\\Recent")
            date = meta.split('INTERNALDATE "', 1)[1].split('"', 1)[0]
            found[(canonical, item[1], frozenset(f.decode() for f in flags), date)] += 1
    conn.logout()
    return found


def store(folder: Path) -> Store:
    folder.mkdir(parents=True, exist_ok=True)
    return Store(default_url(folder / "state.db"))


def job(pair: Pair, user: str, *, admin: bool = False, options: Options | None = None) -> Job:
    src = ImapAccount("127.0.0.1", pair.src.port, "admin", "admin-pw", authorize_as=user,
                      timeout=15) if admin else \
        ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
    dst = ImapAccount("127.0.0.1", pair.dst.port, user, f"pw-{user}", timeout=15)
    return Job(user, lambda: ImapEndpoint(src, readonly=True), lambda: ImapEndpoint(dst),
               options=options or Options())


def copy(pair: Pair, user: str, st: Store, **kw: object) -> MailboxReport:
    return run_jobs([job(pair, user, **kw)], manifest=Manifest(st))[0]  # type: ignore[arg-type]


def test_copy_folders_flags_dates_bytes_then_rerun_copies_nothing(
        pair: Pair, tmp_path: Path) -> None:
    user = pair.user("alice")
    fill(pair.src, user, {
        "INBOX": [(message(i), "(\\Seen)" if i % 2 else "") for i in range(30)],
        "Archive/2023": [(message(100 + i), "(\\Flagged $Work)") for i in range(5)],
        FRENCH: [(message(200), "(\\Answered \\Seen)")],
        "Empty": [],
    })
    before = snapshot(pair.src, user)
    st = store(tmp_path)
    report = copy(pair, user, st, admin=True)  # master user on the source
    assert report.verified and (report.copied, report.present, report.failed) == (36, 0, 0)
    assert snapshot(pair.dst, user, sep=".", prefix="INBOX.") == before
    assert snapshot(pair.src, user) == before  # the source is untouched
    folders = pair.dst.doveadm("mailbox", "list", "-u", user).split()
    assert "INBOX.Empty" in folders  # empty folders are kept, separator translated
    again = copy(pair, user, st)
    assert again.verified and (again.copied, again.present) == (0, 36)
    assert snapshot(pair.dst, user, sep=".", prefix="INBOX.") == before


def test_messages_without_or_sharing_a_message_id(pair: Pair, tmp_path: Path) -> None:
    user = pair.user("bob")
    fill(pair.src, user, {"INBOX": [
        (message(1, msgid=None), ""), (message(2, msgid=None), ""),
        (message(3, msgid="<same@x>", body="first"), ""),
        (message(4, msgid="<same@x>", body="second"), ""),
        (message(5), ""), (message(5), ""),  # an exact duplicate stays a duplicate
    ]})
    st = store(tmp_path)
    report = copy(pair, user, st)
    assert report.verified and report.copied == 6
    assert copy(pair, user, st).copied == 0
    assert sum(snapshot(pair.dst, user, sep=".", prefix="INBOX.").values()) == 6


def test_uidvalidity_reset_on_source_copies_nothing_twice(pair: Pair, tmp_path: Path) -> None:
    user = pair.user("carol")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(12)]})
    st = store(tmp_path)
    assert copy(pair, user, st).copied == 12
    pair.src.doveadm("mailbox", "update", "-u", user, "--uid-validity", "4242", "INBOX")
    status = pair.src.doveadm("mailbox", "status", "-u", user, "uidvalidity", "INBOX")
    assert "4242" in status
    report = copy(pair, user, st)
    assert report.verified and (report.copied, report.present) == (0, 12)
    assert sum(snapshot(pair.dst, user, sep=".", prefix="INBOX.").values()) == 12


def test_special_use_and_folder_map(pair: Pair, tmp_path: Path) -> None:
    user = pair.user("dave")
    fill(pair.src, user, {"Sent Messages": [(message(1), "(\\Seen)")],
                          "Old/Projects": [(message(2), "")]})
    login(pair.dst, user).create("INBOX.Sent")  # the target's \Sent folder exists
    rules = (FolderRule("Old/*", "Archive/*"),)
    report = copy(pair, user, store(tmp_path), options=Options(rules=rules))
    assert report.verified
    targets = {f.folder: f.target for f in report.folders}
    assert targets["Sent Messages"] == "Sent" and targets["Old/Projects"] == "Archive/Projects"
    got = snapshot(pair.dst, user, sep=".", prefix="INBOX.")
    assert {k[0] for k in got} == {"Sent", "Archive/Projects"}


def test_kill_9_mid_copy_then_resume_every_message_once(pair: Pair, tmp_path: Path) -> None:
    user = pair.user("erin")
    total = 300
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(total)]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")
    cmd = [sys.executable, "-m", "reconciler.mover", "copy", "--src",
           f"127.0.0.1:{pair.src.port}", "--dst", f"127.0.0.1:{pair.dst.port}",
           "--users", str(users), "--state", str(tmp_path / "state.db"), "--progress", "json",
           "--batch-messages", "5"]
    proc = subprocess.Popen([*cmd, "--max-msgs-per-s", "100"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # bounded: 30 s
            count = int(pair.dst.doveadm("mailbox", "status", "-u", user, "messages",
                                         "INBOX").split("=")[1])
            if count >= 40 or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the copy finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    partial = int(pair.dst.doveadm("mailbox", "status", "-u", user, "messages",
                                   "INBOX").split("=")[1])
    assert 0 < partial < total
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = Counter(content_hash(k[1]) for k, n in
                  snapshot(pair.dst, user, sep=".", prefix="INBOX.").items() for _ in range(n))
    assert len(ids) == total and set(ids.values()) == {1}


def test_maildir_system_both_ways(pair: Pair, tmp_path: Path) -> None:
    user = pair.user("frank")
    md = MaildirDriver("s1", tmp_path / "s1", ("127.0.0.1", 1), ("127.0.0.1", 2), "s1.internal")
    md.create_mailbox(user)
    lf = b"From: a@x\nMessage-ID: <lf@x>\nSubject: bare LF\n\nbody\n"
    md.append_message(user, "INBOX", lf, flags="S", internal_date=1_600_000_000)
    md.append_message(user, FRENCH, message(7), flags="RS", internal_date=1_600_003_600)
    imap = ImapAccount("127.0.0.1", pair.dst.port, user, f"pw-{user}", timeout=15)

    def run(src: Endpoint, dst: Endpoint, st: Store) -> MailboxReport:
        return run_jobs([Job(user, lambda: src, lambda: dst)], manifest=Manifest(st))[0]

    st = store(tmp_path)
    up = run(DriverEndpoint(md, user), ImapEndpoint(imap), st)
    assert up.verified and up.copied == 2
    got = snapshot(pair.dst, user, sep=".", prefix="INBOX.")
    assert {(k[0], k[2]) for k in got} == {("INBOX", frozenset({"\\Seen"})),
                                           (FRENCH, frozenset({"\\Seen", "\\Answered"}))}
    assert run(DriverEndpoint(md, user), ImapEndpoint(imap), st).copied == 0
    back = MaildirDriver("s2", tmp_path / "s2", ("127.0.0.1", 1), ("127.0.0.1", 2), "s2.i")
    back.create_mailbox(user)
    down = run(ImapEndpoint(imap), DriverEndpoint(back, user), store(tmp_path / "b"))
    assert down.verified and down.copied == 2
    dates = sorted(m.internal_date for f in back.list_folders(user)
                   for m in back.list_messages(user, f))
    assert dates == [1_600_000_000, 1_600_003_600]


def test_dropped_connection_resumes_where_it_stopped(pair: Pair, tmp_path: Path) -> None:
    import asyncio

    from reconciler.mover.runner import run_jobs_async

    user = pair.user("gina")
    total = 120
    fill(pair.src, user, {"INBOX": [(message(i, body="x" * 2000), "") for i in range(total)]})
    cut = {"done": False}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   budget: int | None) -> None:
        sent = 0
        try:
            while data := await reader.read(65536):
                sent += len(data)
                if budget is not None and sent > budget and not cut["done"]:
                    cut["done"] = True  # only the first connection breaks, mid-APPEND
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def go() -> MailboxReport:
        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            sr, sw = await asyncio.open_connection("127.0.0.1", pair.dst.port)
            await asyncio.gather(pipe(cr, sw, 60_000), pipe(sr, cw, None),
                                 return_exceptions=True)
        proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        src = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
        dst = ImapAccount("127.0.0.1", port, user, f"pw-{user}", timeout=15)
        j = Job(user, lambda: ImapEndpoint(src), lambda: ImapEndpoint(dst),
                options=Options(batch_messages=10))
        try:
            return (await run_jobs_async([j], manifest=Manifest(store(tmp_path))))[0]
        finally:
            proxy.close()

    report = asyncio.run(go())
    assert cut["done"] and report.attempts == 2 and report.verified
    ids = Counter(content_hash(k[1]) for k, n in
                  snapshot(pair.dst, user, sep=".", prefix="INBOX.").items() for _ in range(n))
    assert len(ids) == total and set(ids.values()) == {1}


def test_unchanged_folders_are_not_listed_but_any_change_is_seen(
        pair: Pair, tmp_path: Path) -> None:
    user = pair.user("hugo")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(8)],
                          "Sent": [(message(50), "")]})
    st = store(tmp_path)
    assert copy(pair, user, st).copied == 9
    quiet = copy(pair, user, st)
    assert quiet.verified and all(f.unchanged for f in quiet.folders) and quiet.present == 9
    conn = login(pair.dst, user)  # someone expunges a copied message from BOX2
    conn.select("INBOX")
    conn.uid("STORE", "3", "+FLAGS", "(\\Deleted)")
    conn.expunge()
    conn.logout()
    fill(pair.src, user, {"Sent": [(message(51), "")]})  # and new mail in the source
    healed = copy(pair, user, st)
    changed = {f.folder: f.unchanged for f in healed.folders}
    assert healed.verified and healed.copied == 2 and changed == {"INBOX": False, "Sent": False}
    assert sum(snapshot(pair.dst, user, sep=".", prefix="INBOX.").values()) == 10


def logins(server: Dovecot, user: str) -> int:
    """How many IMAP logins of this user the server has logged so far.

    Dovecot's log process writes asynchronously, so a count read at once may miss the
    last login. A login of the user "marker", made after every login to count completed,
    is waited for in the log: once its line is there, the earlier ones are too.
    """
    path = server.dir / "dovecot.log"
    mark = "Login: user=<marker>"
    before = path.read_text(errors="replace").count(mark)
    login(server, "marker").logout()
    text: str = wait_for(lambda: (t := path.read_text(errors="replace")).count(mark) > before
                         and t, timeout=15, what="the marker login in dovecot.log")
    return text.count(f"Login: user=<{user}>")


def test_passes_in_one_process_reuse_logins_and_still_see_every_change(
        pair: Pair, tmp_path: Path) -> None:
    import asyncio

    from reconciler.mover.pool import ConnectionPool
    from reconciler.mover.runner import run_jobs_async

    user = pair.user("jack")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(10)],
                          "Work": [(message(20), "(\\Seen)")]})
    st = store(tmp_path)
    src = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
    dst = ImapAccount("127.0.0.1", pair.dst.port, user, f"pw-{user}", timeout=15)
    seen: dict[str, object] = {}

    async def go() -> list[MailboxReport]:
        pool = ConnectionPool()

        async def one() -> MailboxReport:
            j = Job(user, lambda: ImapEndpoint(src, readonly=True, pool=pool),
                    lambda: ImapEndpoint(dst, pool=pool))
            return (await run_jobs_async([j], manifest=Manifest(st)))[0]

        try:
            first = await one()
            seen["idle"] = len(pool)
            seen["logins"] = (await asyncio.to_thread(logins, pair.src, user),
                              await asyncio.to_thread(logins, pair.dst, user))
            quiet = await one()
            seen["reused"] = pool.reused
            seen["logins_after"] = (await asyncio.to_thread(logins, pair.src, user),
                                    await asyncio.to_thread(logins, pair.dst, user))
            await asyncio.to_thread(fill, pair.src, user, {"INBOX": [(message(30), "")]})
            changed = await one()
            pair.dst.doveadm("kick", user)  # the server drops the idle target connection
            await asyncio.to_thread(  # gone from the server's own list of sessions
                wait_for, lambda: user not in pair.dst.doveadm("who", user),
                15, "the kicked session gone")
            kicked = await one()
            return [first, quiet, changed, kicked]
        finally:
            await pool.close()

    first, quiet, changed, kicked = asyncio.run(go())
    assert first.verified and first.copied == 11 and seen["idle"] == 2
    # the second pass logged in nowhere, listed no message, and still proved every folder
    assert quiet.verified and quiet.copied == 0 and quiet.present == 11
    assert all(f.unchanged for f in quiet.folders) and seen["reused"] == 2
    assert seen["logins_after"] == seen["logins"] and 0 not in seen["logins"]  # type: ignore
    # a pooled connection sees what changed since (no stale STATUS of a selected folder)
    assert changed.verified and changed.copied == 1
    assert {f.folder: f.unchanged for f in changed.folders} == {"INBOX": False, "Work": True}
    # a connection the server dropped while idle costs a fresh login, not a wrong answer
    assert kicked.verified and kicked.copied == 0 and kicked.present == 12
    assert sum(snapshot(pair.dst, user, sep=".", prefix="INBOX.").values()) == 12


class NoListStatusClient(ImapClient):
    """Dovecot as a server without LIST-STATUS: not in the login's capabilities, and the LIST
    sent behind the login asks for a RETURN option the server refuses (BAD), as such a
    server would refuse RETURN (STATUS ...)."""

    async def finish_login(self, pending: Any) -> None:
        await super().finish_login(pending)
        self.capabilities.discard("LIST-STATUS")

    async def start(self, segments: Sequence[Any], name: str, **kw: Any) -> Any:
        if segments[0].startswith(b'LIST "" "*" RETURN'):
            segments = [b'LIST "" "*" RETURN (SPECIAL-USE NO-SUCH-OPTION)']
        return await super().start(segments, name, **kw)


class NoListStatus(ImapEndpoint):
    """An IMAP endpoint on a server without LIST-STATUS."""

    client_type = NoListStatusClient


class GreetingWithout(ImapClient):
    """A server whose greeting lacks some capabilities (`drop`): another login path."""

    drop: tuple[str, ...] = ()

    @classmethod
    async def connect(cls, host: str, port: int, **kw: Any) -> ImapClient:
        client = await super().connect(host, port, **kw)
        client.capabilities -= set(cls.drop)
        return client


class Logins:
    """Counts the LIST commands sent with `simple` (the ones not sent behind the login)."""

    lists = 0


@pytest.mark.parametrize("drop", [(), ("SASL-IR",), ("AUTH=PLAIN", "SASL-IR")],
                         ids=["sasl-ir", "continuation", "login"])
def test_login_pipelined_with_namespace_and_list_and_a_wrong_password_still_says_so(
        pair: Pair, tmp_path: Path, drop: tuple[str, ...]) -> None:
    import asyncio

    user = pair.user("liam")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(3)], "Work": []})

    class Client(GreetingWithout):
        async def simple(self, command: str, **kw: Any) -> Any:
            Logins.lists += command.startswith("LIST")
            return await super().simple(command, **kw)

    Client.drop = drop

    class Endpoint(ImapEndpoint):
        client_type = Client

    def account(server: Dovecot, password: str) -> ImapAccount:
        return ImapAccount("127.0.0.1", server.port, user, password, timeout=15)

    async def folders(password: str) -> tuple[list[str], str, str | None, dict[str, str]]:
        endpoint = Endpoint(account(pair.dst, password))
        await endpoint.open()
        try:
            names = sorted(f.name for f in await endpoint.folders())
            return names, endpoint.prefix, endpoint.separator, endpoint.folder_status
        finally:
            await endpoint.close()

    Logins.lists = 0
    names, prefix, sep, _ = asyncio.run(folders(f"pw-{user}"))
    # the target's namespace (INBOX. prefix, "." separator) came from the early NAMESPACE
    assert (prefix, sep) == ("INBOX.", ".") and "INBOX" in names
    # behind a one-line login no LIST of its own; the continuation login sends it after
    assert Logins.lists == (1 if drop == ("SASL-IR",) else 0)
    with pytest.raises(ImapLoginError, match=f"login as '{user}' refused"):
        asyncio.run(folders("not-the-password"))
    st = store(tmp_path)

    def once(password: str) -> MailboxReport:
        j = Job(user, lambda: Endpoint(account(pair.src, password), readonly=True),
                lambda: Endpoint(account(pair.dst, password)))
        return run_jobs([j], manifest=Manifest(st))[0]

    refused = once("not-the-password")
    assert refused.error and "ImapLoginError" in refused.error and refused.attempts == 1
    assert once(f"pw-{user}").copied == 3
    quiet = once(f"pw-{user}")  # the early LIST-STATUS proves the folders unchanged
    assert quiet.verified and quiet.copied == 0 and all(f.unchanged for f in quiet.folders
                                                        if f.folder == "INBOX")


def test_without_list_status_pipelined_status_gives_the_same_states(
        pair: Pair, tmp_path: Path) -> None:
    import asyncio

    user = pair.user("kate")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(4)],
                          FRENCH: [(message(9), "")], "Empty": []})
    src = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
    dst = ImapAccount("127.0.0.1", pair.dst.port, user, f"pw-{user}", timeout=15)

    async def states() -> tuple[dict[str, str], dict[str, str]]:
        with_ls, without = ImapEndpoint(src), NoListStatus(src)
        await asyncio.gather(with_ls.open(), without.open())
        try:
            assert "LIST-STATUS" in (with_ls.client.capabilities if with_ls.client else ())
            await asyncio.gather(with_ls.folders(), without.folders())
            return with_ls.folder_status, without.folder_status
        finally:
            await asyncio.gather(with_ls.close(), without.close())

    listed, polled = asyncio.run(states())
    # Dovecot may answer UIDVALIDITY 0 for a folder never opened yet (Empty): no state then
    both = set(listed) & set(polled)
    assert {"INBOX", FRENCH} <= both and set(listed) | set(polled) <= {"INBOX", FRENCH, "Empty"}
    assert {k: polled[k] for k in both} == {k: listed[k] for k in both}
    assert listed["INBOX"].endswith("/5/4")  # UIDNEXT 5, 4 messages
    st = store(tmp_path)

    def once() -> MailboxReport:
        j = Job(user, lambda: NoListStatus(src, readonly=True), lambda: NoListStatus(dst))
        return run_jobs([j], manifest=Manifest(st))[0]

    assert once().copied == 5
    quiet = once()
    assert quiet.verified and quiet.present == 5 and all(f.unchanged for f in quiet.folders)


def test_only_a_quiet_connection_goes_back_to_the_pool(pair: Pair) -> None:
    import asyncio

    from reconciler.mover.pool import ConnectionPool

    user = pair.user("kate")
    account = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)

    async def go() -> tuple[int, int, str]:
        pool = ConnectionPool()
        busy, calm = ImapEndpoint(account, pool=pool), ImapEndpoint(account, pool=pool)
        await asyncio.gather(busy.open(), calm.open())
        assert busy.client is not None
        await busy.listing("INBOX")  # leaves INBOX selected
        # a command still in flight: IDLE stays pending until DONE, which never comes
        await busy.client.start([b"IDLE"], "IDLE")
        await busy.close()
        after_busy = len(pool)
        await calm.listing("INBOX")
        await calm.close()  # quiet: UNSELECT, then pooled
        again = ImapEndpoint(account, pool=pool)
        await again.open()
        assert again.client is not None
        # nothing is selected on the pooled connection: a FETCH must be refused
        try:
            await again.client.simple("UID FETCH 1:* (UID)")
            answer = "accepted"
        except Exception as exc:
            answer = type(exc).__name__
        await again.close()
        pooled = len(pool)
        await pool.close()
        return after_busy, pooled, answer

    after_busy, pooled, answer = asyncio.run(go())
    assert after_busy == 0 and pooled == 1 and answer == "ImapCommandError"


def test_merged_folders_are_never_half_skipped(pair: Pair, tmp_path: Path) -> None:
    """Two source folders into one target folder: when one changes, both are listed, or the
    changed one could count the unchanged one's copy of the same message as its own."""
    user = pair.user("liam")
    fill(pair.src, user, {"A": [(message(1), "")], "B": []})
    rules = (FolderRule("A", "Merged"), FolderRule("B", "Merged"))
    st = store(tmp_path)
    first = copy(pair, user, st, options=Options(rules=rules))
    assert first.verified and first.copied == 1
    fill(pair.src, user, {"B": [(message(1), "")]})  # the same message, now in B too
    second = copy(pair, user, st, options=Options(rules=rules))
    assert second.verified and second.copied == 1
    states = {f.folder: f.unchanged for f in second.folders}
    assert states["A"] is False and states["B"] is False  # A unchanged itself, yet listed
    got = snapshot(pair.dst, user, sep=".", prefix="INBOX.")
    assert sum(n for k, n in got.items() if k[0] == "Merged") == 2
    # Nothing changes any more. The folder listed first in the second pass recorded the
    # target's state before its sibling appended, so the third pass may still list both
    # (conservative: a stale state only costs a listing); from then on both are skipped.
    third = copy(pair, user, st, options=Options(rules=rules))
    assert third.verified and third.copied == 0
    fourth = copy(pair, user, st, options=Options(rules=rules))
    assert fourth.verified and fourth.copied == 0 and all(f.unchanged for f in fourth.folders)


def test_cli_rerun_in_a_new_process_proves_every_folder_unchanged(
        pair: Pair, tmp_path: Path) -> None:
    import json

    user = pair.user("ivan")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(5)],
                          "Work": [(message(7), "")]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")

    def cli(state: str) -> subprocess.CompletedProcess[str]:  # a new process each time
        return subprocess.run(
            [sys.executable, "-m", "reconciler.mover", "copy", "--src",
             f"127.0.0.1:{pair.src.port}", "--dst", f"127.0.0.1:{pair.dst.port}", "--users",
             str(users), "--state", state, "--progress", "none", "--report", "json"],
            cwd=REPO, capture_output=True, text=True, timeout=120)

    first = cli(str(tmp_path / "state.db"))
    assert first.returncode == 0, first.stdout + first.stderr
    again = cli(str(tmp_path / "state.db"))  # fresh logins, a store already at head
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads(again.stdout)
    assert report["copied"] == 0 and report["present"] == 6 and report["verified"]
    assert {f["folder"]: f["unchanged"] for f in report["folders"]} == {
        "INBOX": True, "Work": True}


def test_a_state_store_that_cannot_be_opened_fails_the_copy_before_anything_is_copied(
        pair: Pair, tmp_path: Path) -> None:
    user = pair.user("judy")
    fill(pair.src, user, {"INBOX": [(message(i), "") for i in range(3)]})
    users = tmp_path / "users.txt"
    users.write_text(f"{user} pw-{user}\n")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be\n")
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.mover", "copy", "--src", f"127.0.0.1:{pair.src.port}",
         "--dst", f"127.0.0.1:{pair.dst.port}", "--users", str(users), "--state",
         str(blocker / "state.db"), "--progress", "none", "--report", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "unable to open database" in done.stderr or "Not a directory" in done.stderr, \
        done.stderr[-2000:]
    assert not snapshot(pair.dst, user, sep=".", prefix="INBOX.")  # not one message copied


def test_a_move_back_to_the_old_server_ignores_the_first_migrations_manifest(
        pair: Pair, tmp_path: Path) -> None:
    """A -> B as migration 1, then B -> A as migration 2, with B's INBOX under the same
    UIDVALIDITY as A's was (Dovecot's is a creation time in seconds: two mailboxes created
    in one second share it) and B's UIDs holding other messages than A's did (mail arrived
    on B before the copy). Migration 1's rows must not stand for B's UIDs: before they were
    scoped to their migration, every message of B read "changed since listing", on every
    pass, and the move back never verified."""
    user = pair.user("mona")
    fill(pair.src, user, {"INBOX": [(message(300 + i), "") for i in range(6)]})
    fill(pair.dst, user, {"INBOX": [(message(399), "")]})  # arrived at B first: B's UID 1
    st = store(tmp_path)
    there = run_jobs([job(pair, user)], manifest=Manifest(st, 1))[0]
    assert there.verified and there.copied == 6

    validity = pair.src.doveadm("mailbox", "status", "-u", user, "uidvalidity", "INBOX")
    pair.dst.doveadm("mailbox", "update", "-u", user, "--uid-validity",
                     validity.split("=")[1].strip(), "INBOX")
    a = login(pair.src, user)  # A's mailbox emptied (E41 of migration 1), its INBOX kept
    a.select("INBOX")
    a.store("1:*", "+FLAGS", "(\\Deleted)")
    a.expunge()
    a.logout()

    b_account = ImapAccount("127.0.0.1", pair.dst.port, user, f"pw-{user}", timeout=15)
    a_account = ImapAccount("127.0.0.1", pair.src.port, user, f"pw-{user}", timeout=15)
    back = Job(user, lambda: ImapEndpoint(b_account, readonly=True),
               lambda: ImapEndpoint(a_account))
    report = run_jobs([back], manifest=Manifest(st, 2))[0]
    assert report.verified, report.folders
    assert (report.copied, report.failed) == (7, 0)
    got = Counter(data for (folder, data, _, _) in snapshot(pair.src, user).elements()
                  if folder == "INBOX")
    assert sorted(got.values()) == [1] * 7
    assert got == Counter(data for (folder, data, _, _)
                          in snapshot(pair.dst, user, sep=".", prefix="INBOX.").elements()
                          if folder == "INBOX")


def test_a_folder_made_again_under_its_old_uidvalidity_is_read_again(
        pair: Pair, tmp_path: Path) -> None:
    """Within one migration: the source's Work is copied, then deleted and made again
    with other messages, and its UIDVALIDITY is the old one (Dovecot's is the creation
    time in seconds; some servers number every folder from 1), so UIDs 1-6 come back with
    other messages. The manifest's rows say what UIDs 1-6 held before, and the target
    holds exactly those: taken at their word, the pass finds them "present", copies the
    seventh only, and calls the folder verified while six messages exist only on the
    source (the proof E41 deletes by). A cached row whose size is not the listed size
    unmasks the folder: none of its rows is trusted, every body is read."""
    user = pair.user("nina")
    fill(pair.src, user, {"Work": [(message(800 + i), "") for i in range(6)]})
    st = store(tmp_path)
    first = run_jobs([job(pair, user)], manifest=Manifest(st, 7))[0]
    assert first.verified and first.copied == 6
    validity = pair.src.doveadm("mailbox", "status", "-u", user, "uidvalidity", "Work")
    pair.src.doveadm("mailbox", "delete", "-u", user, "Work")
    fill(pair.src, user, {"Work": [(message(900 + i, body="a longer body"), "")
                                   for i in range(7)]})
    pair.src.doveadm("mailbox", "update", "-u", user, "--uid-validity",
                     validity.split("=")[1].strip(), "Work")
    assert validity == pair.src.doveadm("mailbox", "status", "-u", user, "uidvalidity",
                                        "Work")

    again = run_jobs([job(pair, user)], manifest=Manifest(st, 7))[0]
    assert again.verified and again.copied == 7, again.folders
    work = next(f for f in again.folders if f.folder == "Work")
    assert "made again" in work.distrusted and "UID 1 " in work.distrusted
    on_target = Counter(data for (folder, data, _, _)
                        in snapshot(pair.dst, user, sep=".", prefix="INBOX.").elements()
                        if folder == "Work")
    assert on_target == Counter(data for (folder, data, _, _)
                                in snapshot(pair.src, user).elements() if folder == "Work") \
        + Counter(message(800 + i) for i in range(6))


def test_the_final_pass_reads_a_target_folder_made_again_under_its_old_uidvalidity(
        pair: Pair, tmp_path: Path) -> None:
    """The target's Work, copied and proven, is deleted and made again with six other
    messages under its old UIDVALIDITY: the very state triple of the last proof
    (UIDVALIDITY/UIDNEXT/MESSAGES). Before, the final pass (what E41 deletes the source
    by) took the folder as unchanged and verified it with none of the source's messages
    in it. Now it lists every folder, finds UID 1 not the size of the copy proven there,
    reads the folder again and copies the six back."""
    user = pair.user("olga")
    fill(pair.src, user, {"Work": [(message(1000 + i), "") for i in range(6)]})
    st = store(tmp_path)
    first = run_jobs([job(pair, user)], manifest=Manifest(st, 8))[0]
    assert first.verified and first.copied == 6
    status = ("mailbox", "status", "-u", user, "uidvalidity uidnext messages", "INBOX.Work")
    before = pair.dst.doveadm(*status)
    pair.dst.doveadm("mailbox", "delete", "-u", user, "INBOX.Work")
    b = login(pair.dst, user)
    b.create("INBOX.Work")
    for i in range(6):
        b.append("INBOX.Work", None, None, message(1100 + i, body="another, longer one"))
    b.logout()
    pair.dst.doveadm("mailbox", "update", "-u", user, "--uid-validity",
                     before.split("uidvalidity=")[1].split()[0], "INBOX.Work")
    assert pair.dst.doveadm(*status) == before  # the state the last proof recorded

    final = run_jobs([job(pair, user, options=Options(phase="final"))],
                     manifest=Manifest(st, 8))[0]
    work = next(f for f in final.folders if f.folder == "Work")
    assert not work.unchanged and "target UID 1 " in work.distrusted, work
    assert final.verified and final.copied == 6, final.folders
    on_target = Counter(data for (folder, data, _, _)
                        in snapshot(pair.dst, user, sep=".", prefix="INBOX.").elements()
                        if folder == "Work")
    assert on_target == Counter([*(message(1000 + i) for i in range(6)),
                                 *(message(1100 + i, body="another, longer one")
                                   for i in range(6))])
