"""Build the driver of each system named in the specs.

A driver's module is imported when the specs name that driver: each costs 10-15 ms of
start-up (the Postfix tables, the IMAP store, SQLite), paid by every command otherwise."""

from __future__ import annotations

from reconciler.drivers.base import MailSystemDriver
from reconciler.errors import SpecError
from reconciler.spec.model import Endpoint, MailSystemSpec, SpecSet


def make_driver(system: MailSystemSpec, fed_smtp: Endpoint | None = None) -> MailSystemDriver:
    """The driver for one system spec (`fed_smtp`: where a real system relays outgoing mail)."""
    if system.driver == "maildir" and system.lmtp and system.submission:
        from reconciler.drivers.maildir import MaildirDriver  # only when named: start-up

        return MaildirDriver(
            system.name, system.root, (system.lmtp.host, system.lmtp.port),
            (system.submission.host, system.submission.port), system.internal_domain,
        )
    if system.driver == "postfix-dovecot" and system.postfix_dovecot and fed_smtp:
        from reconciler.drivers.postfix_dovecot import PostfixDovecotDriver  # (the same)

        if system.postfix_dovecot.adopt:
            from reconciler.drivers.pfdovecot_adopt import AdoptedPostfixDovecotDriver

            return AdoptedPostfixDovecotDriver(system.name, system.postfix_dovecot, fed_smtp,
                                               system.internal_domain, system.domains)
        return PostfixDovecotDriver(system.name, system.postfix_dovecot, fed_smtp,
                                    system.internal_domain, system.domains)
    if system.driver == "imap" and system.imap:
        from reconciler.drivers.imap import ImapDriver  # (the same)

        return ImapDriver(system.name, system.imap)
    raise SpecError([f"{system.location}: spec.driver: no driver named {system.driver!r} "
                     "with its settings"])


def make_drivers(specs: SpecSet) -> dict[str, MailSystemDriver]:
    """name -> driver for every system of the spec set."""
    return {name: make_driver(system, specs.fed.smtp) for name, system in specs.systems.items()}
