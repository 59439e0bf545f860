"""OAuth2 logins (SASL XOAUTH2 and OAUTHBEARER) against a real Dovecot and a real token endpoint.

The world: a local authorization server on authlib's server side (`oauth2_server`: refresh
token and client credentials grants, short-lived tokens, RFC 7662 introspection) and a
private Dovecot whose `oauth2` passdb asks that introspection endpoint about every token.
Shown: both mechanisms log in (blocking session, the mover, the generic imap driver, the
station agent's upload); a token is replaced before it expires and after the server
refused it; a copy that outlasts its tokens (the connection cut after they expired)
resumes with fresh ones and loses or duplicates nothing; a revoked refresh token stops
the mailbox at once with an error naming the system and the step, and no token, refresh
token or client secret appears in any log or error.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import re
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.mail.imap.blocking import BlockingImap
from mailferry.mail.imap.client import ImapCommandError
from mailferry.mail.oauth2 import OAuth2Error, OAuth2Settings, TokenSource
from reconciler.drivers.base import ImapAccount
from reconciler.drivers.imap import ImapDriver
from reconciler.errors import TemporaryError
from reconciler.mover.endpoints import ImapEndpoint
from reconciler.mover.manifest import Manifest
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.runner import Job, run_jobs, run_jobs_async
from reconciler.spec.model import Endpoint, ImapOptions, OAuth2Options, SecretRef
from reconciler.state.store import Store, default_url
from station_agent import imapupload, localdata

from dovecot import Dovecot, private_root, skip_unless_available
from helpers import mail
from helpers.waiting import wait_for
from oauth2_server import OAuth2Server

USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
SECRET = "client-secret-" + secrets.token_urlsafe(12)


class World:
    def __init__(self) -> None:
        self.auth = OAuth2Server(lifetime=3600).start()
        self.auth.add_client("mailferry", SECRET, ("refresh_token", "client_credentials"),
                             user="erin")
        dovecot = self.auth.store.clients["dovecot"]
        self.root = private_root()
        self.imap = Dovecot(self.root, "oauth", {u: f"pw-{u}" for u in USERS}, oauth2=(
            self.auth.introspection_url, "dovecot", dovecot.client_secret)).start()
        self.refresh = {u: self.auth.grant_refresh_token("mailferry", u) for u in USERS}

    def tokens(self, user: str, mechanism: str = "xoauth2") -> TokenSource:
        refresh = self.refresh[user]
        return TokenSource(OAuth2Settings(
            self.auth.token_url, "mailferry", client_secret=lambda: SECRET,
            refresh_token=lambda: refresh, mechanism=mechanism), where="src: ")

    def account(self, user: str, tokens: TokenSource) -> ImapAccount:
        return ImapAccount("127.0.0.1", self.imap.port, user, "", timeout=15, system="src",
                           oauth=tokens)

    def secrets(self) -> list[str]:
        """Every secret of the run: the client secret, refresh and access tokens."""
        return [SECRET, *self.refresh.values(), *self.auth.access_tokens()]

    def stop(self) -> None:
        self.imap.stop()
        self.auth.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    skip_unless_available()
    w = World()
    yield w
    w.stop()


def login(world: World, user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", world.imap.port, timeout=15)
    conn.login(user, f"pw-{user}")
    return conn


def fill(world: World, user: str, folder: str, count: int, size: int = 200) -> None:
    conn = login(world, user)
    if folder != "INBOX":
        conn.create(folder)
    for i in range(count):
        data = mail.message(f"{folder} {i}", f"<{user}-{folder}-{i}@oauth.example>",
                            f"body {i} " + "x" * size, to=None, auto_id=False)
        assert conn.append(folder, None, None, data)[0] == "OK"
    conn.logout()


def bodies(world: World, user: str, folder: str) -> Counter[bytes]:
    conn = login(world, user)
    conn.select(folder, readonly=True)
    _, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
    conn.logout()
    return Counter(item[1] for item in data if isinstance(item, tuple))


def message_ids(found: Counter[bytes]) -> Counter[str]:
    ids: Counter[str] = Counter()
    for body, n in found.items():
        match = re.search(rb"^Message-ID: (<[^>]+>)", body, re.MULTILINE | re.IGNORECASE)
        assert match, body[:200]
        ids[match.group(1).decode()] += n
    return ids


def store(folder: Path) -> Store:
    folder.mkdir(parents=True, exist_ok=True)
    return Store(default_url(folder / "state.db"))


def logins(world: World, method: str) -> int:
    log = (world.imap.dir / "dovecot.log").read_text(errors="replace")
    return len(re.findall(rf"Login: user=<[^>]+>, method={method}\b", log))


# -- logging in ----------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_login_with_a_bearer_token(world: World, mechanism: str) -> None:
    tokens = world.tokens("alice", mechanism)
    before = logins(world, mechanism.upper())
    conn = BlockingImap.connect("127.0.0.1", world.imap.port, timeout=15)
    try:
        conn.login_oauth("alice", tokens)
        assert conn.select("INBOX").uidvalidity  # authenticated: SELECT works
    finally:
        conn.logout()
    assert tokens.fetches == 1
    wait_for(lambda: logins(world, mechanism.upper()) == before + 1, timeout=10,
             what=f"Dovecot logs a {mechanism} login")
    # Another user's token is refused (the introspection names alice): NO, with the
    # challenge's status, and no token in the text.
    conn = BlockingImap.connect("127.0.0.1", world.imap.port, timeout=15)
    try:
        with pytest.raises(ImapCommandError) as refused:
            conn.login_oauth("bob", tokens)
    finally:
        conn.logout()
    assert refused.value.status == "NO" and f"{mechanism.upper()}: status " in str(refused.value)
    assert not any(s in str(refused.value) for s in world.secrets())


def test_client_credentials_grant(world: World) -> None:
    tokens = TokenSource(OAuth2Settings(world.auth.token_url, "mailferry", "client_credentials",
                                        client_secret=lambda: SECRET))
    issued = world.auth.store.issued["client_credentials"]
    conn = BlockingImap.connect("127.0.0.1", world.imap.port, timeout=15)
    try:
        conn.login_oauth("erin", tokens)  # the test server's application acts for erin
    finally:
        conn.logout()
    assert world.auth.store.issued["client_credentials"] == issued + 1


def test_a_token_is_replaced_before_it_expires_and_after_a_refusal(world: World) -> None:
    world.auth.lifetime = 4.0
    try:
        tokens = world.tokens("bob")
        first = tokens.token()
        assert tokens.token() == first and tokens.fetches == 1  # cached
        # A quarter of the lifetime before it ends, the next login gets a new one while
        # the old one is still active at the endpoint.
        wait_for(lambda: tokens.token() != first, timeout=10, interval=0.1,
                 what="a new token before the old expires")
        issued = next(t for t in world.auth.store.tokens if t.access_token == first)
        assert not issued.is_expired() and tokens.fetches == 2
        # Revoked at the provider while still cached: the server refuses it, the login
        # takes one fresh token and succeeds.
        world.auth.lifetime = 3600.0
        tokens.token()
        world.auth.expire_all()
        cached = tokens.fetches
        conn = BlockingImap.connect("127.0.0.1", world.imap.port, timeout=15)
        try:
            conn.login_oauth("bob", tokens)
        finally:
            conn.logout()
        assert tokens.fetches == cached + 1
    finally:
        world.auth.lifetime = 3600.0


# -- the mover ----------------------------------------------------------------------------
def test_a_copy_that_outlasts_its_tokens_resumes_with_fresh_ones(
        world: World, tmp_path: Path) -> None:
    """Tokens of 3 s; the target connection is cut once every token issued so far has
    expired (mid-APPEND): the retry logs both sides in with refreshed tokens and resumes
    from the manifest. Every Message-ID once, bytes identical."""
    total = 150
    fill(world, "carol", "INBOX", total, size=3000)
    world.auth.lifetime = 3.0
    src_tokens, dst_tokens = world.tokens("carol"), world.tokens("dave", "oauthbearer")
    cut = {"done": False, "expired": False}

    def expired() -> bool:
        return all(t.is_expired() for t in world.auth.store.tokens
                   if t.access_token is not None and t.user in ("carol", "dave"))

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   budget: int | None) -> None:
        sent = 0
        try:
            while data := await reader.read(65536):
                sent += len(data)
                if budget is not None and sent > budget and not cut["done"]:
                    cut["done"] = True  # the first target connection, mid-copy
                    deadline = time.monotonic() + 15
                    while not expired() and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)  # the copy stalls past the tokens' end
                    cut["expired"] = expired()
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def go() -> MailboxReport:
        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            sr, sw = await asyncio.open_connection("127.0.0.1", world.imap.port)
            await asyncio.gather(pipe(cr, sw, 150_000), pipe(sr, cw, None),
                                 return_exceptions=True)
        proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        src = world.account("carol", src_tokens)
        dst = ImapAccount("127.0.0.1", port, "dave", "", timeout=15, system="dst",
                          oauth=dst_tokens)
        job = Job("carol", lambda: ImapEndpoint(src, readonly=True), lambda: ImapEndpoint(dst),
                  options=Options(batch_messages=10))
        try:
            return (await run_jobs_async([job], manifest=Manifest(store(tmp_path))))[0]
        finally:
            proxy.close()

    try:
        report = asyncio.run(go())
    finally:
        world.auth.lifetime = 3600.0
    assert cut["done"] and cut["expired"]  # cut once every first token had expired
    assert report.error is None and report.attempts == 2 and report.verified, report
    assert src_tokens.fetches == 2 and dst_tokens.fetches == 2  # refreshed for the retry
    copied = bodies(world, "dave", "INBOX")
    assert copied == bodies(world, "carol", "INBOX")  # byte-identical, each once
    ids = message_ids(copied)
    assert len(ids) == total and set(ids.values()) == {1}


def test_a_revoked_refresh_token_stops_the_mailbox_with_a_clear_error(
        world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fill(world, "frank", "INBOX", 3)
    caplog.set_level(logging.DEBUG)
    # the authorization server's own debug lines print what it issues: not ours
    caplog.set_level(logging.WARNING, logger="authlib.oauth2")
    tokens = world.tokens("frank")
    assert tokens.token()  # it worked once
    world.auth.revoke_refresh(world.refresh["frank"])
    world.auth.expire_all()
    job = Job("frank", lambda: ImapEndpoint(world.account("frank", tokens), readonly=True),
              lambda: ImapEndpoint(world.account("bob", world.tokens("bob"))))
    report = run_jobs([job], manifest=Manifest(store(tmp_path)))[0]
    assert report.attempts == 1 and report.error is not None  # no retry can fix it
    error = report.error
    assert error.startswith("ImapLoginError: src: IMAP 127.0.0.1:"), error
    assert f"OAuth2 refresh_token grant at {world.auth.token_url} refused: invalid_grant" \
        in error, error
    assert "'frank'" in error
    shown = caplog.text + error
    assert not any(s in shown for s in world.secrets())
    assert bodies(world, "bob", "INBOX") == Counter()  # nothing half-done


# -- the generic imap driver ----------------------------------------------------------------
def test_the_imap_driver_logs_each_mailbox_in_with_its_own_refresh_token(
        world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.WARNING, logger="authlib.oauth2")
    fill(world, "alice", "Archive", 2)
    lines = tmp_path / "refresh-tokens"
    lines.write_text("# address token\n" + "".join(
        f"{u}@corp.example {t}\n" for u, t in world.refresh.items() if u != "bob"))
    secret = tmp_path / "client-secret"
    secret.write_text(SECRET + "\n")
    driver = ImapDriver("hosted", ImapOptions(
        server=Endpoint("127.0.0.1", world.imap.port), state_dir=str(tmp_path / "state"),
        tls="none", login="oauth2", login_format="{local}", oauth2=OAuth2Options(
            token_url=world.auth.token_url, client_id="mailferry",
            client_secret=SecretRef(file=str(secret)),
            refresh_tokens=SecretRef(file=str(lines)), mechanism="oauthbearer")))
    assert "Archive" in driver.list_folders("alice=corp.example")
    account = driver.imap_account("alice=corp.example")
    assert account.oauth is not None and account.password == ""
    assert driver.imap_account("alice=corp.example").oauth is account.oauth  # one cache
    assert driver.imap_account("carol=corp.example").oauth is not account.oauth
    with pytest.raises(TemporaryError) as missing:  # bob has no line
        driver.list_folders("bob=corp.example")
    assert "no refresh token for bob@corp.example" in str(missing.value)
    assert "hosted: IMAP 127.0.0.1:" in str(missing.value)
    assert not any(s in caplog.text + str(missing.value) for s in world.secrets())


# -- the station agent ----------------------------------------------------------------------
def test_the_station_agents_upload_logs_in_with_oauthbearer(world: World, tmp_path: Path) -> None:
    before = logins(world, "OAUTHBEARER")
    account = imapupload.ImapAccount("127.0.0.1", world.imap.port, "none", "alice", "",
                                     oauth=world.tokens("alice", "oauthbearer"))
    items = []
    for i in range(3):
        data = mail.message(f"local {i}", f"<local-{i}@station.example>", f"body {i}",
                            to=None, auto_id=False)
        items.append(localdata.LocalMessage("Local Folders/Old", data, "S", None,
                                            imapupload._normalised_sha(data)))
    manifest = localdata.Manifest(tmp_path, 1)
    size = sum(len(m.data) for m in items)
    counts = imapupload.upload(account, items, manifest, imapupload.Progress(size))
    assert counts["uploaded"] == 3
    wait_for(lambda: logins(world, "OAUTHBEARER") > before, timeout=10,
             what="an OAUTHBEARER login")
    conn = login(world, "alice")
    names = [line.decode() for line in conn.list()[1] if isinstance(line, bytes)]
    conn.logout()
    folder = next(n.rsplit(' "/" ', 1)[1] for n in names if "Old" in n)
    assert set(message_ids(bodies(world, "alice", folder))) == {
        f"<local-{i}@station.example>" for i in range(3)}
    # A refresh token the endpoint refuses: an ImapError naming the step, no secret.
    bad = imapupload.ImapAccount("127.0.0.1", world.imap.port, "none", "alice", "",
                                 oauth=TokenSource(OAuth2Settings(
                                     world.auth.token_url, "mailferry",
                                     client_secret=lambda: SECRET,
                                     refresh_token=lambda: "not-a-refresh-token",
                                     mechanism="oauthbearer")))
    with pytest.raises(imapupload.ImapError) as refused:
        imapupload.upload(bad, items, localdata.Manifest(tmp_path, 2),
                          imapupload.Progress(size))
    assert "no OAuth2 token" in str(refused.value) and "invalid_grant" in str(refused.value)
    assert "not-a-refresh-token" not in str(refused.value) and SECRET not in str(refused.value)


def test_an_unreachable_token_endpoint_is_temporary(world: World) -> None:
    from sysutil import free_port
    tokens = TokenSource(OAuth2Settings(f"http://127.0.0.1:{free_port()}/token", "mailferry",
                                        client_secret=lambda: SECRET,
                                        refresh_token=lambda: "whatever"))
    with pytest.raises(OAuth2Error) as failed:
        tokens.token()
    assert not failed.value.permanent and "failed: ConnectionError" in str(failed.value)


def test_the_station_agents_oauth2_settings(tmp_path: Path) -> None:
    from station_agent.config import ConfigError, load
    (tmp_path / "rt").write_text("refresh-" + SECRET + "\n")
    path = tmp_path / "agent.toml"
    path.write_text('[imap.oauth2]\ntoken_url = "https://login.example/token"\n'
                    'client_id = "app"\nrefresh_token_file = "rt"\n')
    settings = load(path)["imap_oauth2"]
    assert isinstance(settings, OAuth2Settings) and settings.mechanism == "oauthbearer"
    assert settings.refresh_token is not None and settings.refresh_token() == "refresh-" + SECRET
    assert settings.client_secret is None and SECRET not in repr(settings)
    path.write_text('[imap.oauth2]\ntoken_url = "https://login.example/token"\n'
                    'client_id = "app"\nrefresh_token_file = "rt"\nmechanism = "plain"\n')
    with pytest.raises(ConfigError, match=r"imap\.oauth2\.mechanism must be"):
        load(path)
    path.write_text('[imap.oauth2]\nclient_id = "app"\nrefresh_token_file = "rt"\n')
    with pytest.raises(ConfigError, match=r"imap\.oauth2\.token_url is missing"):
        load(path)
