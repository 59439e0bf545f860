"""Serving the status page: beside a running engine, or on its own (`reconcile web`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from reconciler.api.server import BackgroundApp
from reconciler.engine import Engine
from reconciler.errors import MailferryError
from reconciler.spec.loader import SPEC_SUFFIXES, load_specs
from reconciler.spec.model import SpecSet
from reconciler.web.app import check_bind, make_app
from reconciler.web.snapshot import Source

log = logging.getLogger("reconciler.web")
DEFAULT_LISTEN = "127.0.0.1:8027"


class StatusPageServer(BackgroundApp):
    """The status page in a background thread."""

    name = "status page"


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (HOST defaults to 127.0.0.1)."""
    host, _, port = listen.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise MailferryError(f"--listen/--web wants HOST:PORT, not {listen!r}") from None


def read_token(path: str | None) -> str | None:
    """The page's bearer token from a file (never from the command line: invariant 7)."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MailferryError(f"status page token: cannot read {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise MailferryError(f"status page token in {path} is shorter than 16 characters")
    return token


class FollowSpecs:
    """The engine for `reconcile web`, rebuilt when a spec file of the folder changes (as
    `--watch` does; invalid specs keep the last good engine, said in the log)."""

    def __init__(self, specs_dir: str, build: Callable[[SpecSet], Engine]) -> None:
        self.specs_dir = Path(specs_dir)
        self.build = build
        self._stamp = self._files()
        self.engine = build(load_specs(self.specs_dir, long_lived=True))
        self._lock = threading.Lock()

    def _files(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        for path in sorted(self.specs_dir.iterdir()):
            if path.suffix in SPEC_SUFFIXES and path.is_file():
                info = path.stat()
                found.append((path.name, info.st_mtime_ns, info.st_size))
        return tuple(found)

    def __call__(self) -> Engine:
        with self._lock:
            stamp = self._files()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self.engine = self.build(load_specs(self.specs_dir, long_lived=True))
                except MailferryError as exc:
                    log.warning("status page: specs not reloaded, keeping the last good "
                                "ones: %s", exc)
            return self.engine


def status_page_for(engine: Engine | Callable[[], Engine], listen: str = DEFAULT_LISTEN, *,
                    token_file: str | None = None) -> StatusPageServer:
    """A (not yet started) status page for an engine, or a callable returning the current
    one; refuses a non-loopback address without a token."""
    host, port = parse_listen(listen)
    token = read_token(token_file)
    check_bind(host, token)
    current: Callable[[], Engine] = engine if callable(engine) else (lambda: engine)
    source = Source(current)
    return StatusPageServer(lambda: make_app(source, token=token), host=host, port=port)
