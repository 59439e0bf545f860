"""Build the driver of each system named in the specs."""

from __future__ import annotations

from reconciler.drivers.base import MailSystemDriver
from reconciler.errors import SpecError
from reconciler.spec.model import MailSystemSpec, SpecSet


def make_driver(system: MailSystemSpec) -> MailSystemDriver:
    """The driver for one system spec."""
    if system.driver == "maildir":
        from reconciler.drivers.maildir import MaildirDriver

        return MaildirDriver(
            system.name, system.root, (system.lmtp.host, system.lmtp.port),
            (system.submission.host, system.submission.port), system.internal_domain,
        )
    raise SpecError([f"{system.location}: spec.driver: no driver named {system.driver!r}"])


def make_drivers(specs: SpecSet) -> dict[str, MailSystemDriver]:
    """name -> driver for every system of the spec set."""
    return {name: make_driver(system) for name, system in specs.systems.items()}
