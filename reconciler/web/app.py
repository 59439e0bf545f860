"""The status page over HTTP: aiohttp routes, Jinja2 templates, access control.

Read-only by construction: only GET (and HEAD) routes exist, nothing here writes to the
state store or calls a mutating fed route. Every value that came from a spec, a mailbox, a
station or a server goes through Jinja2's autoescaping, and the Content-Security-Policy
allows scripts only from this server (`/static/live.js`): a `<script>` in a spec value is
shown as text, and would not run even if it got through.

Access: `check_bind` refuses any address but loopback without a token. With a token every
request needs it, as `Authorization: Bearer TOKEN` (scripts) or as the password of HTTP
Basic authentication (browsers ask for it; any user name), compared in constant time.
Behind a reverse proxy that authenticates people, bind to 127.0.0.1 and let the proxy
forward (docs/status-page.md).

Live updates: `live.js` re-fetches the page's `#live` part every two seconds with
`?part=live` and swaps it in; without JavaScript the page is still complete (reload it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from reconciler.errors import MailferryError
from reconciler.status import check_state_filter
from reconciler.web.snapshot import Source
from reconciler.web.templating import templates
from reconciler.web.views import STATES, failures, state_filters, suspended_commands
from reconciler.web.views import table as mailbox_table
from reconciler.web.views import waves as wave_views

HERE = Path(__file__).resolve().parent
STATIC = {"live.js": "text/javascript", "style.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
RENDERED_KEPT = 64  # rendered overviews kept per snapshot (distinct filter/page queries)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise MailferryError(
            f"the status page listens on {host}, beyond this machine, but has no token: give "
            "--token-file FILE (a bearer token), or listen on 127.0.0.1 behind a reverse "
            "proxy that authenticates (docs/status-page.md)")


def authorised(header: str, token: str) -> bool:
    """`Bearer TOKEN` or HTTP Basic with TOKEN as the password (constant-time)."""
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    return hmac.compare_digest(given.encode(), token.encode())


def make_app(source: Source, *, token: str | None = None) -> web.Application:
    """The status page's application."""
    env = templates()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and not authorised(request.headers.get("Authorization", ""), token):
            return web.Response(status=401, text="a token is needed: Authorization: Bearer",
                                headers={"WWW-Authenticate": 'Basic realm="mailferry"'})
        response = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def off_loop(call: Callable[[], Any]) -> Any:
        """The reads are blocking (SQLAlchemy, fed over HTTP): run them off the loop."""
        return await asyncio.get_running_loop().run_in_executor(None, call)

    # The rendered overview of the current snapshot, per query: several screens polling
    # every two seconds between two refreshes get the same bytes without a second render.
    rendered: dict[str, Any] = {"snap": None, "pages": {}}

    def html(text: str) -> web.Response:
        response = web.Response(text=text, content_type="text/html")
        response.enable_compression()  # gzip/deflate when the browser asks (a remote screen)
        return response

    def render(request: web.Request, name: str, **context: Any) -> web.Response:
        part = request.query.get("part") == "live"
        template = env.get_template(f"_{name}" if part else name)
        return html(template.render(stale=source.error, **context))

    async def overview(request: web.Request) -> web.Response:
        query = request.query
        placement = query.get("placement") or None
        system = query.get("system") or None
        state = query.get("state") or None
        if query.get("failed"):
            state = "failed"
        try:
            check_state_filter(state)
        except MailferryError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        try:
            page = int(query.get("page", "1"))
        except ValueError:
            page = 1
        snap = await off_loop(source.snapshot)
        if rendered["snap"] is not snap:
            rendered.update(snap=snap, pages={})
        key = f"{source.error}\n{request.path_qs}"
        if key in rendered["pages"]:
            return html(rendered["pages"][key])
        if len(rendered["pages"]) >= RENDERED_KEPT:
            rendered["pages"].clear()
        response = render(request, "overview.html", snap=snap, waves=wave_views(snap),
                          failures=failures(snap), suspended=suspended_commands(snap),
                          table=mailbox_table(snap, placement=placement, system=system,
                                              state=state, page=page),
                          filters=state_filters(snap),
                          chosen={"placement": placement or "", "system": system or "",
                                  "state": "" if query.get("failed") else (state or ""),
                                  "failed": bool(query.get("failed"))},
                          query=dict(query))
        rendered["pages"][key] = response.text
        return response

    async def mailbox(request: web.Request) -> web.Response:
        address = request.match_info["address"]
        detail = await off_loop(lambda: source.mailbox(address))
        if detail.migration is None and detail.row is None:
            raise web.HTTPNotFound(text=f"no mailbox {address} in the specs or the records")
        return render(request, "mailbox.html", d=detail, snap=source.snapshot(), STATES=STATES)

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=(HERE / "static" / name).read_bytes(),
                            content_type=STATIC[name])

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", overview)
    app.router.add_get("/mailbox/{address:.+}", mailbox)  # a local part may hold "/"
    app.router.add_get("/static/{name}", static)
    return app
