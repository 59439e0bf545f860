"""The station API for a running engine: drivers and target facts taken from its specs."""

from __future__ import annotations

from reconciler.api.server import StationApiServer
from reconciler.drivers.base import MailSystemDriver
from reconciler.engine import Engine
from reconciler.errors import TemporaryError


def station_api_for(engine: Engine, *, host: str = "127.0.0.1", port: int = 0) -> StationApiServer:
    """A (not yet started) station API serving `engine`'s state store and systems."""

    def driver_for(system: str) -> MailSystemDriver:
        try:
            return engine.drivers[system]
        except KeyError:
            raise TemporaryError(f"no system {system!r} in the specs") from None

    def target_info(system: str) -> dict[str, object]:
        spec = engine.specs.systems[system]
        return {"submission": str(spec.submission) if spec.submission else None,
                "mailbox_type": spec.driver,
                "system": system}

    return StationApiServer(engine.store, driver_for, target_info, host=host, port=port)
