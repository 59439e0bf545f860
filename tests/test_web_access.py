"""The status page's access rules and its behaviour when fed is away.

- beyond loopback only with a token: `reconcile web --listen` on another address without
  `--token-file` exits 1 before binding anything;
- with a token every route needs it (Bearer, or the password of HTTP Basic), compared in
  constant time; a wrong or missing one gets 401 and nothing of the page;
- read-only: no route takes POST/PUT/DELETE;
- fed unreachable or without a token: the page still answers, saying so, with the plan made
  from the records.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from reconciler.errors import MailferryError
from reconciler.fedclient import FedClient
from reconciler.web.app import authorised, check_bind
from reconciler.web.server import read_token, status_page_for

from sysutil import free_port
from world import World, placement, policy, run_cli

TOKEN = "s3cret-token-for-the-status-page"


def get(url: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()


def test_token_checks() -> None:
    assert authorised(f"Bearer {TOKEN}", TOKEN)
    assert authorised(basic(TOKEN), TOKEN)
    assert not authorised("Bearer wrong", TOKEN)
    assert not authorised(basic("wrong"), TOKEN)
    assert not authorised("Basic !!!not-base64", TOKEN)
    assert not authorised("", TOKEN)
    assert not authorised(TOKEN, TOKEN)  # no scheme


def test_bind_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    with pytest.raises(MailferryError, match="token-file"):
        check_bind("0.0.0.0", None)
    with pytest.raises(MailferryError, match="token-file"):
        check_bind("192.0.2.7", "")
    check_bind("0.0.0.0", TOKEN)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(MailferryError, match="shorter than 16"):
        read_token(str(short))


def test_cli_refuses_a_public_bind_without_token(world: World, tmp_path: Path) -> None:
    specs = world.write(tmp_path / "specs", [])
    done = run_cli("--specs", str(specs), "--state", str(tmp_path / "s.db"), "web",
                   "--listen", f"0.0.0.0:{free_port()}", cwd=tmp_path, timeout=30)
    assert done.returncode == 1
    assert "beyond this machine, but has no token" in done.stderr


def test_token_needed_on_every_route_and_read_only(world: World, tmp_path: Path) -> None:
    specs = world.write(tmp_path / "specs", [placement("acc-home", "s1",
                                                       [{"address": "acc1@corp.example"}])])
    engine = world.engine(specs, f"sqlite:///{tmp_path / 's.db'}")
    engine.apply()
    token_file = tmp_path / "page.token"
    token_file.write_text(TOKEN + "\n")
    with status_page_for(engine, "127.0.0.1:0", token_file=str(token_file)) as page:
        for path in ("/", "/?part=live", "/mailbox/acc1@corp.example", "/static/live.js"):
            status, body = get(page.url + path)
            assert status == 401 and "acc1" not in body, path
            assert get(page.url + path, {"Authorization": "Bearer nope"})[0] == 401
            assert get(page.url + path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
            assert get(page.url + path, {"Authorization": basic(TOKEN)})[0] == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, body = get(page.url + "/", auth)
        assert "acc1@corp.example" in body
        for method in ("POST", "PUT", "DELETE"):
            assert get(page.url + "/", auth, method)[0] == 405
        assert get(page.url + "/?state=bogus", auth)[0] == 400
        assert get(page.url + "/mailbox/nobody@corp.example", auth)[0] == 404


def test_page_answers_with_fed_away(world: World, tmp_path: Path) -> None:
    specs = world.write(tmp_path / "specs", [placement("away-home", "s1",
                                                       [{"address": "away1@corp.example"}])])
    engine = world.engine(specs, f"sqlite:///{tmp_path / 's.db'}")
    engine.apply()
    engine.fed = FedClient(f"http://127.0.0.1:{free_port()}", "token", timeout=2)
    with status_page_for(engine, "127.0.0.1:0") as page:
        status, body = get(page.url + "/")
    assert status == 200
    assert "cannot connect to fed at http://127.0.0.1:" in body and "away1@corp.example" in body
    assert "could not be read" in body  # the plan is made without fed's directory, said
    engine.fed = FedClient(engine.specs.fed.control_url, "", timeout=2)
    with status_page_for(engine, "127.0.0.1:0") as page:
        status, body = get(page.url + "/")
    assert status == 200 and "no fed token" in body


def test_page_shows_a_copy_running_in_the_same_process(world: World, tmp_path: Path) -> None:
    """In `--watch --web` the page reads the engine's own copy figures while E15 runs (the
    manifest rows are committed only with the step)."""
    address = "live1@corp.example"
    state = f"sqlite:///{tmp_path / 's.db'}"
    home = world.engine(world.write(tmp_path / "v1", [placement("live-home", "s1",
                                                                [{"address": address}])]), state)
    home.apply()
    engine = world.engine(world.write(tmp_path / "v2", [
        policy("live-p"), placement("live-wave", "s2", [{"address": address}],
                                    policy_name="live-p")]), state)
    engine.register_systems()
    from reconciler.engine import ApplyReport

    for _ in range(10):  # bounded: up to the copy step (state 7)
        engine.apply_pass(ApplyReport())
        if any(m.state == 7 for m in engine.migrations() if m.address == address):
            break
    engine.progress.mailbox_started(address, 40, 4_000_000)
    engine.progress.advanced(address, 10, 1_000_000, copied=10)
    with status_page_for(engine, "127.0.0.1:0") as page:
        status, body = get(f"{page.url}/mailbox/{address}")
        assert status == 200
        assert "copying now: 10/40 messages, 1.0 MB of 4.0 MB" in body
        assert "25% copying" in get(page.url + "/")[1]
        engine.progress.mailbox_done(address, {"verified": True})
        # The next snapshot no longer counts it as running.
        wait = time.monotonic() + 10
        while "25% copying" in get(page.url + "/")[1] and time.monotonic() < wait:
            time.sleep(0.2)
        assert "25% copying" not in get(page.url + "/")[1]


def test_watch_and_serve_serve_the_page(world: World, tmp_path: Path) -> None:
    address = "served1@corp.example"
    specs = world.write(tmp_path / "specs", [placement("served-home", "s1",
                                                       [{"address": address}])])
    port = free_port()
    watch = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state",
         str(tmp_path / "s.db"), "--watch", "--allow-dirty", "--web", f"127.0.0.1:{port}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = wait_page(f"http://127.0.0.1:{port}/", address + "</a>")
        assert "served-home" in body
    finally:
        watch.terminate()
        _, err = watch.communicate(timeout=30)
    assert watch.returncode == 0 and f"status page on http://127.0.0.1:{port}" in err

    # `reconcile serve --web`: a spec set of its own (its own ports), its fed answering.
    own = tmp_path / "own"
    own.mkdir()
    from world import base_documents

    (own / "base.yaml").write_text(yaml.safe_dump_all(base_documents(own), sort_keys=False))
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--specs", str(own), "--state",
         str(own / "s.db"), "serve", "--web", f"127.0.0.1:{port}"],
        cwd=own, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = wait_page(f"http://127.0.0.1:{port}/", "Holds in force (0)")
        assert "cannot connect to fed" not in body
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def wait_page(url: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            status, body = get(url)
            if status == 200 and text in body:
                return body
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never showed {text!r}: {body[:500]}")


def test_web_follows_spec_edits_and_odd_addresses(world: World, tmp_path: Path) -> None:
    """`reconcile web` picks up an edited spec folder; an address with "/" and "&" in its
    local part has a working page (the link from the table leads to it)."""
    odd = "sl/a&sh@corp.example"
    specs = world.write(tmp_path / "specs", [placement("edit-one", "s1",
                                                       [{"address": "edit1@corp.example"}])])
    world.engine(specs, f"sqlite:///{tmp_path / 's.db'}").apply()
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state",
         str(tmp_path / "s.db"), "web", "--listen", f"127.0.0.1:{port}"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_page(url + "/", "edit-one")
        world.write(specs, [placement("edit-one", "s1", [{"address": "edit1@corp.example"}]),
                            placement("edit-two", "s1", [{"address": odd}])])
        body = wait_page(url + "/", "edit-two")
        link = body.split('href="/mailbox/sl')[1].split('"')[0]
        status, page = get(f"{url}/mailbox/sl{link}")
        assert status == 200 and "sl/a&amp;sh@corp.example" in page
    finally:
        web.terminate()
        web.wait(timeout=30)
