"""How fast the status page answers with 10,000 mailboxes in the state store.

Why: during a cutover weekend the page is open on several screens and polls every two
seconds; it must stay under 200 ms for a whole installation's wave, not only for a demo.

Setup (the spec set and state store of `bench/plan_scale.py`: N mailboxes in placements of
10,000, three quarters moving to s2, migrations in assorted states, one in fifty failed),
plus one data mover pass recorded for every migration past state 6, and a real fed (the
embedded one) whose directory holds every address (an up-sync). The page runs in this
process as `reconcile web` runs it (`reconciler.web`), on 127.0.0.1.

Measured, each `--rounds` times, median, 95th percentile and worst of the whole HTTP
response, the page as shipped (served from the newest snapshot; a request finding it older
than a second starts a refresh in the background, which shares the cores:
`reconciler/web/snapshot.py`; the overview is rendered once per snapshot and query,
`reconciler/web/app.py`):

- `/`; `/?part=live` (what `live.js` fetches every two seconds); `/?state=failed`; one
  mailbox page;
- the snapshot refresh itself (state store read, fed's directory, holds, queue and nodes,
  the plan, the copy figures): how old the page's figures can be;
- in headless Chromium (when Selenium and /usr/bin/chromium are there): the browser's own
  load time of `/` (navigation start to the load event, the stylesheet and script
  included; with its DOM node count and the bytes on the wire, gzipped), and of a small
  page (one mailbox's) as the floor of this browser here;
- the peer, in the same run: `reconcile status` doing the same work in-process
  (`status_rows` + `table`, one fed directory read and the plan) — the text table that
  existed before the page. The ratio page/peer says what the HTML costs on top.

Usage: `python bench/web_scale.py [--mailboxes 10000] [--rounds 20]`.
The last line reads `status page 10000 mailboxes: X ms (median)`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))


def add_runs(state: Path) -> int:
    """One recorded copy pass per migration past its cutover (the copy columns' figures)."""
    from sqlalchemy import insert, select

    from reconciler.state.model import Migration, TransferRun
    from reconciler.state.store import open_store

    store = open_store(f"sqlite:///{state}")
    with store.session() as session:
        rows = session.execute(select(Migration.id, Migration.address, Migration.state)
                               .where(Migration.state >= 7)).all()
    now = datetime.now(UTC)
    runs = [{"migration_id": mid, "mailbox": address, "phase": "copy", "copied": 400,
             "present": 0, "failed": 0, "bytes_copied": 20_000_000, "seconds": 40.0,
             "verified": st >= 8, "messages_total": 400, "bytes_total": 20_000_000,
             "missing": 0, "at": now} for mid, address, st in rows]
    with store.engine.begin() as conn:
        for k in range(0, len(runs), 5000):
            conn.execute(insert(TransferRun), runs[k:k + 5000])
    store.close()
    return len(runs)


def timed(call: Any, rounds: int) -> dict[str, float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
            "worst_ms": times[-1]}


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as response:
        return len(response.read())


def browser_load(urls: list[str], rounds: int) -> list[dict[str, float]] | None:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not Path("/usr/bin/chromium").exists():
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="mf-bench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        results = []
        for url in urls:
            loads, firsts, parsed = [], [], []
            nodes = wire = 0.0
            for _ in range(rounds):
                driver.get(url)
                load, first, nodes, wire, interactive = driver.execute_script(
                    "var t = performance.getEntriesByType('navigation')[0];"
                    "return [t.loadEventEnd - t.startTime, t.responseStart - t.startTime,"
                    " document.getElementsByTagName('*').length, t.transferSize,"
                    " t.domInteractive - t.startTime];")
                loads.append(float(load))
                firsts.append(float(first))
                parsed.append(float(interactive))
            loads.sort()
            results.append({"median_ms": statistics.median(loads),
                            "p95_ms": loads[min(len(loads) - 1, int(len(loads) * 0.95))],
                            "worst_ms": loads[-1], "first_byte_ms": statistics.median(firsts),
                            "parsed_ms": statistics.median(parsed),
                            "dom_nodes": float(nodes), "wire_bytes": float(wire)})
        return results
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from plan_scale import generate, upsync_generated

    from reconciler.cli import build_engine
    from reconciler.embedded import start_embedded
    from reconciler.spec.loader import load_specs
    from reconciler.status import status_rows, table
    from reconciler.web.app import make_app
    from reconciler.web.server import StatusPageServer
    from reconciler.web.snapshot import Source

    root = Path(tempfile.mkdtemp(prefix="mf-web-bench-"))
    try:
        specs_dir, state, directory = generate(root, args.mailboxes)
        runs = add_runs(state)
        specs = load_specs(specs_dir)
        with start_embedded(specs, log_dir=root / "logs"):
            upsync_generated(specs, directory)
            engine = build_engine(specs, str(state))
            failed = next(m.address for m in engine.migrations() if m.failed_reason)
            results: dict[str, dict[str, float] | None] = {}
            # As shipped: a request finding the snapshot older than a second starts a
            # background refresh (sharing the two cores with the requests) and is served
            # from the newest snapshot.
            source = Source(lambda: engine)
            page = StatusPageServer(lambda: make_app(source))
            with page:
                size = fetch(page.url + "/")
                results["/"] = timed(lambda: fetch(page.url + "/"), args.rounds)
                results["/?part=live"] = timed(lambda: fetch(page.url + "/?part=live"),
                                               args.rounds)
                results["/?state=failed"] = timed(lambda: fetch(page.url + "/?state=failed"),
                                                  args.rounds)
                results["/mailbox/ADDRESS"] = timed(lambda: fetch(f"{page.url}/mailbox/{failed}"),
                                                    args.rounds)
                loads = browser_load([page.url + "/", f"{page.url}/mailbox/{failed}"],
                                     args.rounds)
                results["browser load of /"] = loads[0] if loads else None
                # The floor: the same browser loading a small page (one mailbox's).
                results["browser load of /mailbox/ADDRESS"] = loads[1] if loads else None
            results["snapshot refresh (background)"] = timed(source.refresh, args.rounds)
            results["peer: reconcile status (in-process)"] = timed(
                lambda: table(status_rows(engine)), args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"status page, {args.mailboxes} mailboxes ({runs} copy passes on record), "
          f"page of {size / 1000:.0f} kB, {args.rounds} rounds")
    for name, figures in results.items():
        if figures is None:
            print(f"  {name:40} (no chromium/selenium: skipped)")
            continue
        first = (f"   (first byte {figures['first_byte_ms']:.1f} ms, "
                 f"parsed {figures['parsed_ms']:.1f} ms, "
                 f"{figures['dom_nodes']:.0f} DOM nodes, "
                 f"{figures['wire_bytes'] / 1000:.0f} kB on the wire)"
                 if "first_byte_ms" in figures else "")
        print(f"  {name:40} median {figures['median_ms']:7.1f} ms   "
              f"p95 {figures['p95_ms']:7.1f} ms   worst {figures['worst_ms']:7.1f} ms{first}")
    front = results["/"]
    peer = results["peer: reconcile status (in-process)"]
    assert front is not None and peer is not None
    print(f"  ratio page/peer (median): {front['median_ms'] / peer['median_ms']:.3f}")
    print(f"status page {args.mailboxes} mailboxes: {front['median_ms']:.0f} ms (median)")


if __name__ == "__main__":
    main()
