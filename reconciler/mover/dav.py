"""Diary data over CalDAV and CardDAV (patent E16-E17): calendars and contacts, by UID.

Why plain WebDAV over the standard library rather than the `caldav` package: the mover needs
five requests (PROPFIND to find collections and list items with their ETags, GET, PUT with
If-Match / If-None-Match, MKCOL to create a collection) on both calendars *and* address
books. `caldav` covers CalDAV only (no CardDAV), and brings its own HTTP stack and search
layer; `urllib` is enough, is always there, and keeps one code path for both kinds.

What a sync does, per source collection (calendar or address book) of a user:

- the target collection of the same name is created if missing (MKCOL with the right
  resource type, RFC 5689), so the user's calendars keep their names;
- items are matched by their UID (iCalendar UID, vCard UID), never by file name: servers
  name resources as they like, and a re-run must find what the previous one put;
- an item absent from the target is PUT with ``If-None-Match: *`` (never overwrites);
- an item present in both is replaced only when the source version is newer: a higher
  SEQUENCE or, at equal SEQUENCE, a later LAST-MODIFIED/DTSTAMP for iCalendar (the rules
  of `calendar.py`), a later REV for vCard; the PUT carries ``If-Match`` with the target's
  ETag so an edit made meanwhile in BOX2 is never silently lost (412: counted as failed,
  retried on the next pass);
- nothing is ever deleted, on either side.

`verify_dav` re-lists the target and returns every source UID missing or older there. The
embedded maildir system's diary (one calendar.ics) syncs with a CalDAV calendar through
`calendar.merge_calendars` (`driver_to_dav`, `dav_to_driver`).
"""

from __future__ import annotations

import base64
import re
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime

from icalendar import Calendar, Component

from mailferry.mail.http import HttpClient, HttpError
from reconciler.drivers.base import MailSystemDriver
from reconciler.mover.calendar import ITEM_KINDS, _version, merge_calendars

NS = {"d": "DAV:", "c": "urn:ietf:params:xml:ns:caldav", "a": "urn:ietf:params:xml:ns:carddav"}
_PROPFIND = (b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/>'
             b"<d:getetag/><d:displayname/></d:prop></d:propfind>")
_MKCOL = {
    "calendar": '<d:resourcetype><d:collection/><c:calendar/></d:resourcetype>',
    "addressbook": '<d:resourcetype><d:collection/><a:addressbook/></d:resourcetype>',
}
_REV = re.compile(r"^REV[;:](?:.*:)?(.+)$", re.MULTILINE | re.IGNORECASE)
_VCARD_UID = re.compile(r"^UID[;:](?:[^:\r\n]*:)?(.+?)\r?$", re.MULTILINE | re.IGNORECASE)


class DavError(Exception):
    """An HTTP or protocol failure."""


@dataclass(frozen=True)
class DavAccount:
    """A user's home on a CalDAV/CardDAV server: ``http://host:port/`` + user collection."""

    base_url: str  # the user's home collection, e.g. http://127.0.0.1:5232/alice/
    user: str
    password: str
    timeout: float = 30.0

    def __repr__(self) -> str:
        return f"DavAccount({self.user}@{self.base_url})"


@dataclass
class DavItem:
    """One calendar object or vCard."""

    href: str
    etag: str
    uid: str
    data: bytes


@dataclass
class DavReport:
    """Outcome of a diary sync."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason)
    missing: list[str] = field(default_factory=list)  # after verification

    @property
    def verified(self) -> bool:
        return not self.missing


class DavClient:
    """Blocking WebDAV requests with HTTP basic authentication."""

    def __init__(self, account: DavAccount) -> None:
        self.account = account
        token = base64.b64encode(f"{account.user}:{account.password}".encode()).decode()
        self._auth = f"Basic {token}"
        # One kept-alive connection for the whole copy of a mailbox's calendars.
        self.http = HttpClient(account.base_url, name="DAV server", timeout=account.timeout)

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); HTTP errors are returned, network errors raise."""
        try:
            answer = self.http.request(method, urllib.parse.urljoin(self.account.base_url, url),
                                       body, headers={"Authorization": self._auth,
                                                      **(headers or {})})
        except HttpError as exc:
            raise DavError(f"{method} {url}: {exc}") from exc
        return answer.status, answer.headers, answer.body

    def propfind(self, url: str, depth: str = "1") -> list[tuple[str, set[str], str]]:
        """(href, resource types, etag) of a collection and its members."""
        status, _, body = self.request("PROPFIND", url, _PROPFIND,
                                       {"Depth": depth, "Content-Type": "application/xml"})
        if status == 404:
            return []
        if status != 207:
            raise DavError(f"PROPFIND {url}: HTTP {status}")
        result = []
        for response in ET.fromstring(body).findall("d:response", NS):
            href = urllib.parse.unquote(response.findtext("d:href", "", NS))
            kinds: set[str] = set()
            etag = ""
            for propstat in response.findall("d:propstat", NS):
                if "200" not in propstat.findtext("d:status", "", NS):
                    continue
                for rt in propstat.iterfind("d:prop/d:resourcetype/*", NS):
                    kinds.add(rt.tag.split("}")[-1])
                etag = propstat.findtext("d:prop/d:getetag", etag, NS) or etag
            result.append((href, kinds, etag))
        return result

    def collections(self) -> dict[str, str]:
        """Collection name -> kind ('calendar' or 'addressbook') in the user's home."""
        home = urllib.parse.urlparse(self.account.base_url).path
        found: dict[str, str] = {}
        for href, kinds, _ in self.propfind(home):
            name = href.rstrip("/").rsplit("/", 1)[-1]
            if href.rstrip("/") == home.rstrip("/"):
                continue
            if "calendar" in kinds:
                found[name] = "calendar"
            elif "addressbook" in kinds:
                found[name] = "addressbook"
        return found

    def make_collection(self, name: str, kind: str) -> None:
        """Extended MKCOL (RFC 5689) of a calendar or address book; existing is fine."""
        body = ('<?xml version="1.0"?><d:mkcol xmlns:d="DAV:" '
                'xmlns:c="urn:ietf:params:xml:ns:caldav" '
                'xmlns:a="urn:ietf:params:xml:ns:carddav"><d:set><d:prop>'
                f"{_MKCOL[kind]}<d:displayname>{name}</d:displayname>"
                "</d:prop></d:set></d:mkcol>").encode()
        status, _, _ = self.request("MKCOL", f"{urllib.parse.quote(name)}/", body,
                                    {"Content-Type": "application/xml"})
        if status not in (201, 405):  # 405: exists already
            raise DavError(f"MKCOL {name}: HTTP {status}")

    def items(self, name: str) -> list[DavItem]:
        """Every item of a collection, fetched (diaries are small next to mail)."""
        base = f"{urllib.parse.quote(name)}/"
        result = []
        for href, kinds, etag in self.propfind(base):
            if "collection" in kinds or href.endswith("/"):
                continue
            status, headers, data = self.request("GET", urllib.parse.quote(href))
            if status != 200:
                raise DavError(f"GET {href}: HTTP {status}")
            result.append(DavItem(href, headers.get("ETag", etag), uid_of(data), data))
        return result

    def put(self, name: str, item_uid: str, data: bytes, kind: str, *,
            href: str | None = None, etag: str | None = None) -> int:
        """PUT a new item (If-None-Match: *) or replace one (If-Match: etag); HTTP status."""
        ext, ctype = (".ics", "text/calendar") if kind == "calendar" else (".vcf", "text/vcard")
        safe = re.sub(r"[^A-Za-z0-9@._-]", "_", item_uid)[:200] or "item"
        url = urllib.parse.quote(href) if href else \
            f"{urllib.parse.quote(name)}/{urllib.parse.quote(safe)}{ext}"
        headers = {"Content-Type": f"{ctype}; charset=utf-8"}
        headers.update({"If-Match": etag} if etag else {"If-None-Match": "*"})
        return self.request("PUT", url, data, headers)[0]


def uid_of(data: bytes) -> str:
    """The UID of an iCalendar object or vCard ('' when none)."""
    text = data.decode("utf-8", "replace")
    if "BEGIN:VCALENDAR" in text.upper():
        try:
            for comp in Calendar.from_ical(data).subcomponents:
                if comp.name in ITEM_KINDS and comp.get("UID"):
                    return str(comp.get("UID"))
        except ValueError:
            return ""
        return ""
    match = _VCARD_UID.search(text)
    return match.group(1).strip() if match else ""


def _newer(source: bytes, target: bytes, kind: str) -> bool:
    """Whether the source version supersedes the target's."""
    if kind == "addressbook":
        a = _REV.search(source.decode("utf-8", "replace"))
        b = _REV.search(target.decode("utf-8", "replace"))
        if a is None:
            return False
        return b is None or a.group(1).strip() > b.group(1).strip()
    try:
        src, dst = Calendar.from_ical(source), Calendar.from_ical(target)
    except ValueError:
        return False
    epoch = (0, datetime(1970, 1, 1, tzinfo=UTC))
    best = max((_version(c) for c in src.subcomponents if c.name in ITEM_KINDS), default=epoch)
    have = max((_version(c) for c in dst.subcomponents if c.name in ITEM_KINDS), default=epoch)
    return best > have


def sync_dav(source: DavAccount, target: DavAccount) -> DavReport:
    """Copy every calendar and address book item the target lacks or holds older."""
    report = DavReport()
    src, dst = DavClient(source), DavClient(target)
    have_cols = dst.collections()
    for name, kind in sorted(src.collections().items()):
        if name not in have_cols:
            dst.make_collection(name, kind)
        theirs = {i.uid: i for i in dst.items(name) if i.uid}
        for item in src.items(name):
            if not item.uid:
                report.failed.append((item.href, "no UID"))
                continue
            existing = theirs.get(item.uid)
            if existing is None:
                status = dst.put(name, item.uid, item.data, kind)
                bucket = "added"
            elif _newer(item.data, existing.data, kind):
                status = dst.put(name, item.uid, item.data, kind, href=existing.href,
                                 etag=existing.etag or None)
                bucket = "updated"
            else:
                report.unchanged += 1
                continue
            if status in (200, 201, 204):
                setattr(report, bucket, getattr(report, bucket) + 1)
            else:
                report.failed.append((item.uid, f"PUT HTTP {status}"))
    report.missing = verify_dav(source, target)
    return report


def verify_dav(source: DavAccount, target: DavAccount) -> list[str]:
    """'collection/UID' of every source item missing or older in the target."""
    src, dst = DavClient(source), DavClient(target)
    have_cols = dst.collections()
    missing = []
    for name, kind in sorted(src.collections().items()):
        theirs = {i.uid: i for i in dst.items(name)} if name in have_cols else {}
        for item in src.items(name):
            got = theirs.get(item.uid)
            if item.uid and (got is None or _newer(item.data, got.data, kind)):
                missing.append(f"{name}/{item.uid}")
    return missing


def driver_to_dav(driver: MailSystemDriver, mailbox_id: str, target: DavAccount,
                  collection: str = "calendar") -> DavReport:
    """The embedded system's calendar.ics into a CalDAV calendar, one object per UID."""
    report = DavReport()
    ics = driver.read_diary(mailbox_id)
    if ics is None:
        return report
    dst = DavClient(target)
    if collection not in dst.collections():
        dst.make_collection(collection, "calendar")
    theirs = {i.uid: i for i in dst.items(collection)}
    cal = Calendar.from_ical(ics)
    zones = [c for c in cal.subcomponents if c.name == "VTIMEZONE"]
    by_uid: dict[str, Calendar] = {}
    for comp in cal.subcomponents:
        if comp.name not in ITEM_KINDS or not comp.get("UID"):
            continue
        one = by_uid.setdefault(str(comp["UID"]), _wrapper(cal, zones))
        one.add_component(comp)  # a series and its edited occurrences stay together
    for uid, one in by_uid.items():
        data = bytes(one.to_ical())
        existing = theirs.get(uid)
        if existing is not None and not _newer(data, existing.data, "calendar"):
            report.unchanged += 1
            continue
        status = dst.put(collection, uid, data, "calendar",
                         href=existing.href if existing else None,
                         etag=(existing.etag or None) if existing else None)
        if status in (200, 201, 204):
            if existing:
                report.updated += 1
            else:
                report.added += 1
        else:
            report.failed.append((uid, f"PUT HTTP {status}"))
    after = {i.uid: i for i in dst.items(collection)}
    report.missing = [u for u, one in by_uid.items() if u not in after
                      or _newer(bytes(one.to_ical()), after[u].data, "calendar")]
    return report


def dav_to_driver(source: DavAccount, driver: MailSystemDriver, mailbox_id: str) -> DavReport:
    """Every CalDAV calendar object merged into the embedded system's calendar.ics."""
    report = DavReport()
    src = DavClient(source)
    for name, kind in sorted(src.collections().items()):
        if kind != "calendar":
            continue
        for item in src.items(name):
            merged, changed = merge_calendars(item.data, driver.read_diary(mailbox_id))
            if changed:
                driver.write_diary(mailbox_id, merged)
                report.added += changed
            else:
                report.unchanged += 1
    return report


def _wrapper(cal: Calendar, zones: list[Component]) -> Calendar:
    one = Calendar()
    one.add("PRODID", str(cal.get("PRODID", "-//mailferry//mover//EN")))
    one.add("VERSION", "2.0")
    for zone in zones:
        one.add_component(zone)
    return one
