"""The status page's mailbox table over HTTP, in pages, against a real world.

A spec set of 233 mailboxes: 230 in one placement on s1, then 3 in a second on s2 (last in
the plan's order, on page 3 unfiltered). The page shows 100 rows with "showing 1-100 of
233" and a next link; page 3 the last 33 with a previous link; the placement and system
filters find the 3 far-away mailboxes on their page 1; the live part (what `live.js`
fetches) of page 2 is page 2's rows, so the poll keeps updating the page shown; a page past
the end or not a number shows the nearest page, never an error; gzip when asked for.
"""

from __future__ import annotations

import gzip
import html
import re
import urllib.request
from pathlib import Path

from reconciler.web.server import status_page_for
from reconciler.web.views import PAGE_ROWS

from world import World, placement

MANY = [f"pg{i:03d}@corp.example" for i in range(230)]
LATE = [f"zz-late{i}@corp.example" for i in range(3)]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return str(response.read().decode())


def rows(body: str) -> list[str]:
    table = body.split('id="mailbox-table"')[1].split("</table>")[0]
    return re.findall(r'<tr class="[^"]*" data-address="([^"]+)"', table)


def shown(body: str) -> str:
    line = body.split('id="paging">')[1].split("\n")[0]
    return html.unescape(re.sub(r"<[^>]+>", "", line)).strip()


def test_table_pages_filters_and_live_part(world: World, tmp_path: Path) -> None:
    specs = world.write(tmp_path / "specs", [
        placement("pg-many", "s1", [{"address": a} for a in MANY]),
        placement("pg-late", "s2", [{"address": a} for a in LATE])])
    engine = world.engine(specs, f"sqlite:///{tmp_path / 's.db'}")
    with status_page_for(engine, "127.0.0.1:0") as page:
        first = get(page.url + "/")
        assert rows(first) == sorted(MANY)[:PAGE_ROWS]
        assert shown(first) == "showing 1\u2013100 of 233"
        assert 'href="?page=2" rel="next"' in first and 'rel="prev"' not in first
        last = get(page.url + "/?page=3")
        assert rows(last) == sorted(MANY)[200:] + LATE
        assert shown(last) == "showing 201\u2013233 of 233"
        assert 'href="?page=2" rel="prev"' in last and 'rel="next"' not in last
        for query in ("placement=pg-late", "system=s2"):
            body = get(f"{page.url}/?{query}")
            assert rows(body) == LATE and shown(body) == "showing 1\u20133 of 3"
        # The live part of page 2 is page 2, and the page polls it with its own query.
        second = get(page.url + "/?placement=pg-many&page=2")
        assert 'data-live="?placement=pg-many&amp;page=2&amp;part=live"' in second
        assert 'href="?placement=pg-many&amp;page=3" rel="next"' in second
        live = get(page.url + "/?placement=pg-many&page=2&part=live")
        assert rows(live) == sorted(MANY)[100:200] == rows(second)
        assert shown(live) == "showing 101\u2013200 of 230"
        assert rows(get(page.url + "/?page=99")) == rows(last)
        assert rows(get(page.url + "/?page=x")) == rows(first)
        # A browser asking for gzip gets it (a screen across a slow link).
        request = urllib.request.Request(page.url + "/", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert rows(gzip.decompress(response.read()).decode()) == rows(first)
