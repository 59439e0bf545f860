"""The station API for a running engine: drivers and target facts taken from its specs.

`target_info(system)` is what a station learns about the new system: its submission server
(and TLS mode), and, where the system has one, its IMAP server -- the endpoints the agent
switches the user's mail client to and uploads local mail through.

`reconcile --watch` rebuilds its engine on every good spec change, so the API takes either an
engine or a callable returning the current one: a system added to the specs after the watch
started must be reachable by stations without restarting the watch.
"""

from __future__ import annotations

from collections.abc import Callable

from reconciler.api.server import StationApiServer
from reconciler.drivers.base import MailSystemDriver
from reconciler.engine import Engine
from reconciler.errors import TemporaryError


def station_api_for(engine: Engine | Callable[[], Engine], *, host: str = "127.0.0.1",
                    port: int = 0) -> StationApiServer:
    """A (not yet started) station API serving the engine's state store and systems."""
    current: Callable[[], Engine] = engine if callable(engine) else (lambda: engine)

    def driver_for(system: str) -> MailSystemDriver:
        try:
            return current().drivers[system]
        except KeyError:
            raise TemporaryError(f"no system {system!r} in the specs") from None

    def target_info(system: str) -> dict[str, object]:
        spec = current().specs.systems[system]
        submission = spec.submission or (
            spec.postfix_dovecot.smtp if spec.postfix_dovecot is not None else None)
        info: dict[str, object] = {
            "submission": str(submission) if submission is not None else None,
            "submission_tls": "none",
            "mailbox_type": spec.driver, "system": system,
        }
        # Systems with an IMAP server tell the agent where the user's client will read mail;
        # the embedded maildir system has none, and the agent then uploads local mail
        # through this API.
        if spec.postfix_dovecot is not None:
            imap = spec.postfix_dovecot.imap
            info["imap"] = {"host": imap.host, "port": imap.port,
                            "tls": spec.postfix_dovecot.imap_tls}
        return info

    return StationApiServer(current().store, driver_for, target_info, host=host, port=port)
