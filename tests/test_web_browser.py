"""The status page in a real browser: headless Chromium (Debian's, driven by Selenium).

The world is the demo's (fed, s1 and s2 as real processes, `tests/world.py`); the page is
`reconcile web` as a subprocess on its own port, reading the same state store the test's
engine writes. The test moves mailboxes one engine pass at a time and waits, without
reloading the page, until what the browser shows (each row's state, each wave's counts)
is what the state store says: the live update and the view agree with the records.

A failure is real too: a source message with a broken header in a folder named like an HTML
tag fails E12 (validate-and-copy); the page must list it first with its reason, as text,
and the retry command. A placement description carrying `<script>` must be shown as text:
no alert, no script element, no element made from it.

Screenshots of the overview and of a mailbox page at the end are written to
`var/screenshots/` (or `$MAILFERRY_SCREENSHOTS`), as the README says.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from sqlalchemy import select

from reconciler.demo import fill_old_mail
from reconciler.drivers.base import mailbox_id_for
from reconciler.engine import ApplyReport, Engine
from reconciler.state.model import Migration

from helpers import waiting
from sysutil import free_port
from world import REPO, World, placement, policy

pytestmark = pytest.mark.timeout(240)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCRIPT = "<script>window.__pwned = 1; alert('pwned')</script>"
TAG_FOLDER = "<img src=x onerror=alert(2)>"
SHOTS = Path(os.environ.get("MAILFERRY_SCREENSHOTS", REPO / "var" / "screenshots"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """helpers' wait_for, looking again when the live part swapped under us."""
    return waiting.wait_for(check, timeout, what, interval=0.2, retry_on=(WebDriverException,))


class WebPage:
    """`reconcile web` as a subprocess for one spec folder and state store."""

    def __init__(self, specs: Path, state: str, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (cwd / f"web-{self.port}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "--specs", str(specs), "--state", state, "web",
             "--listen", f"127.0.0.1:{self.port}"], cwd=cwd, stdout=self.log,
            stderr=subprocess.STDOUT)
        wait_for("reconcile web to answer", self._answers)

    def _answers(self) -> bool:
        assert self.process.poll() is None, "reconcile web exited"
        try:
            with urllib.request.urlopen(self.url + "/", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


def store_states(engine: Engine, addresses: list[str]) -> dict[str, str]:
    """address -> the state column as the status table writes it ('-' before E1)."""
    with engine.store.session() as session:
        rows = {m.address: m for m in session.scalars(select(Migration).where(
            Migration.address.in_(addresses)).order_by(Migration.id))}
        return {a: "-" if a not in rows else f"{rows[a].state}"
                + (" failed" if rows[a].failed_reason else "") for a in addresses}


def page_states(driver: webdriver.Chrome) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#mailbox-table tbody tr")
    return {str(r.get_attribute("data-address")): str(r.get_attribute("data-state"))
            for r in rows}


def wave_counts(driver: webdriver.Chrome, name: str) -> tuple[int, int, int]:
    wave = driver.find_element(By.CSS_SELECTOR, f'.wave[data-placement="{name}"]')
    return (int(str(wave.get_attribute("data-total"))), int(str(wave.get_attribute("data-done"))),
            int(str(wave.get_attribute("data-failed"))))


def no_alert(driver: webdriver.Chrome) -> bool:
    try:
        _ = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def described(doc: dict[str, Any], text: str) -> dict[str, Any]:
    doc["metadata"]["description"] = text
    return doc


def test_page_follows_a_running_migration(world: World, tmp_path: Path,
                                          browser: webdriver.Chrome) -> None:
    addresses = [f"webmove{i}@corp.example" for i in range(1, 6)]
    boxes = [{"address": a} for a in addresses]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    first = world.engine(world.write(tmp_path / "v1", [placement("web-home", "s1", boxes)]),
                         state)
    first.apply()
    rng = random.Random(19)
    old = {a: len(fill_old_mail(first.drivers["s1"], mailbox_id_for(a), a, 6, rng))
           for a in addresses}
    specs = world.write(tmp_path / "v2", [
        policy("web-copy"),
        described(placement("web-wave", "s2", boxes, policy_name="web-copy"), SCRIPT)])
    engine = world.engine(specs, state)
    page = WebPage(specs, state, tmp_path)
    (SHOTS / "overview-running.png").unlink(missing_ok=True)
    try:
        browser.get(page.url + "/")
        browser.execute_script("window.__loaded_once = 1;")
        wait_for("every mailbox listed", lambda: page_states(browser) == store_states(
            engine, addresses))
        assert wave_counts(browser, "web-wave") == (5, 0, 0)
        total = sum(old.values())
        def wave_text() -> str:
            return str(browser.find_element(By.CSS_SELECTOR,
                                            '.wave[data-placement="web-wave"]').text)

        # The spec's <script> is text: shown, not run, not an element.
        description = browser.find_element(By.CSS_SELECTOR, ".wave .description").text
        assert description == SCRIPT
        assert no_alert(browser)
        assert browser.execute_script("return window.__pwned === undefined")
        assert browser.execute_script(
            "return document.querySelectorAll('main script').length") == 0

        engine.register_systems()
        seen: list[dict[str, str]] = []
        for _ in range(30):  # bounded: a migration is a dozen passes
            if not engine.apply_pass(ApplyReport(), chain=False):  # the held state between passes
                break
            want = store_states(engine, addresses)
            seen.append(want)
            wait_for(f"the page to show {want}", lambda w=want: page_states(browser) == w)  # type: ignore[misc]
            done = sum(1 for s in want.values() if s.split()[0] in ("10", "13"))
            wait_for("the wave's counts", lambda d=done: wave_counts(browser, "web-wave")  # type: ignore[misc]
                     == (5, d, 0))
            if len(seen) == 1:  # recorded, nothing copied: totals from the source mailboxes
                wait_for("the wave's totals measured",
                         lambda: f"copied: 0 of {total} messages" in wave_text())
            if set(want.values()) == {"5"}:  # E5-E8 done, E9 not yet: fed holds them all
                wait_for("fed's holds on the page", lambda: "Holds in force (5)" in
                         browser.find_element(By.ID, "fed").text)
                held = browser.find_element(By.ID, "fed").text
                assert all(a in held for a in addresses)
                SHOTS.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(str(SHOTS / "overview-running.png"))
        assert seen and all(s == "13" for s in seen[-1].values()), seen
        assert (SHOTS / "overview-running.png").exists()  # the holds were seen on the page
        assert len({tuple(s.values()) for s in seen}) >= 4  # the page followed several steps
        # Every update came through live.js: the page was never reloaded.
        assert browser.execute_script("return window.__loaded_once") == 1
        assert f"copied: {total} of {total} messages" in wave_text()

        browser.save_screenshot(str(SHOTS / "overview.png"))
        browser.get(f"{page.url}/mailbox/{addresses[0]}")
        timeline = browser.find_elements(By.CSS_SELECTOR, "ol.timeline li.reached")
        reached = [int(str(li.get_attribute("data-state"))) for li in timeline]
        assert reached[-1] == 13 and 6 in reached and 8 in reached
        assert "held " in browser.find_element(By.ID, "hold").text
        events = browser.find_element(By.ID, "events").text
        assert "E9" in events and "E41" in events
        browser.save_screenshot(str(SHOTS / "mailbox.png"))
    finally:
        page.stop()


def test_failed_migration_shows_reason_first(world: World, tmp_path: Path,
                                             browser: webdriver.Chrome) -> None:
    address = "webfail@corp.example"
    boxes = [{"address": address}, {"address": "webfine@corp.example"}]
    state = f"sqlite:///{tmp_path / 'state.db'}"
    first = world.engine(world.write(tmp_path / "v1", [placement("web-f-home", "s1", boxes)]),
                         state)
    first.apply()
    s1 = first.drivers["s1"]
    s1.append_message(mailbox_id_for(address), TAG_FOLDER, b"no header here\r\n\r\nbody\r\n")
    specs = world.write(tmp_path / "v2", [
        policy("web-validate", dataTransfer="validate-and-copy"),
        placement("web-f-wave", "s2", boxes, policy_name="web-validate")])
    engine = world.engine(specs, state)
    engine.apply()
    with engine.store.session() as session:
        m = session.scalars(select(Migration).where(Migration.address == address)
                            .order_by(Migration.id.desc())).first()
        assert m is not None and m.failed_step == "E12", (m and m.failed_reason)
        reason = str(m.failed_reason)
    assert TAG_FOLDER in reason
    page = WebPage(specs, state, tmp_path)
    try:
        browser.get(page.url + "/")
        row = wait_for("the failure listed", lambda: browser.find_element(
            By.CSS_SELECTOR, f'#failures tr.failure[data-address="{address}"]'))
        assert row.find_element(By.CSS_SELECTOR, ".reason").text == reason
        assert f"reconcile retry {address}" in row.text
        # Failures come before the waves and the table.
        sections = [s.get_attribute("id") for s in browser.find_elements(By.CSS_SELECTOR,
                                                                         "main section")]
        assert sections[0] == "failures"
        assert wave_counts(browser, "web-f-wave") == (2, 1, 1)
        # The folder name from the mailbox is text, not an <img> with an onerror.
        assert browser.execute_script("return document.querySelectorAll('img').length") == 0
        assert no_alert(browser)
        # The failed filter keeps just that row.
        browser.find_element(By.NAME, "failed").click()
        browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
        wait_for("the failed filter", lambda: list(page_states(browser)) == [address])
        browser.find_element(By.LINK_TEXT, address).click()
        wait_for("the mailbox page", lambda: browser.find_element(By.ID, "address").text
                 == address)
        assert reason in browser.find_element(By.ID, "failure").text
        assert no_alert(browser)
    finally:
        page.stop()


def test_docs_screenshot_is_committed() -> None:
    """The README shows the overview; the committed picture must exist and be a PNG."""
    shot = REPO / "docs" / "status-page.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/status-page.png" in (REPO / "README.md").read_text(encoding="utf-8")
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists()
