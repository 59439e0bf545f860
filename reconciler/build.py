"""An engine from a spec set: its state store, fed client and drivers.

Apart from the CLI because the CLI, the demo, the tests and the benchmarks all build one:
the demo importing the CLI (and the CLI the demo) was an import cycle.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.drivers.registry import make_drivers
from reconciler.engine import Engine
from reconciler.errors import MailferryError
from reconciler.fedclient import FedClient
from reconciler.secrets import resolve
from reconciler.spec.model import SpecSet
from reconciler.state.store import open_store


def state_url(state: str | None) -> str:
    """The SQLAlchemy URL of `--state` (a URL, a SQLite file, default ./var/state.db)."""
    if state:
        return state if "://" in state else f"sqlite:///{Path(state).resolve()}"
    path = Path("var/state.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def build_engine(specs: SpecSet, state: str | None, *, read_only: bool = False) -> Engine:
    """The engine for a spec set: state store, fed client, drivers.

    `read_only` (plan, status): a fed token that is not set is no error, the engine plans
    from the state store and says what it could not read (`Engine.fed_unavailable`)."""
    unavailable = None
    try:
        token = resolve(specs.fed.token, what=f"the token of FedHub {specs.fed.name}")
    except MailferryError as exc:
        if not read_only:
            raise
        token, unavailable = "", str(exc)
    fed = FedClient(specs.fed.control_url, token)
    engine = Engine(specs, open_store(state_url(state)), fed, make_drivers(specs))
    engine.fed_unavailable = unavailable
    return engine
