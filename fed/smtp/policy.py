"""Who may make fed relay mail to a domain it does not serve (invariant 8: no open relay).

fed is the hub the mail systems send through, so it must pass their outgoing mail on to
the outside world, and nobody else's. "A sender claiming a local address" proves nothing
(envelope senders are free text), so a claim alone never opens the relay. Relaying to a
foreign domain is allowed only for

(a) a client in one of the configured relay networks (``--relay-network CIDR``,
    repeatable) whose envelope sender is one of the mail systems' own addresses (a
    directory entry or a physical address of a registered system), or the null sender
    ``<>`` (the systems' own bounces and DSNs must get out); or
(b) a client that authenticated with SMTP AUTH (``auth.py``), whatever its address.

There is **no default relay network**, not even loopback: on a shared host any local
process could otherwise forge a directory sender and relay. The networks are named
explicitly: by the admin (``--relay-network``), or by the specs (``reconcile serve`` passes
the FedHub's ``relayNetworks`` and the submission hosts of the maildir systems it starts
itself). Submission from anywhere else needs SMTP AUTH.

Everything else gets ``550 5.7.1 relaying denied``. The decision is taken at RCPT time;
routing accepted outside mail (smarthost, MX) is delivery's job.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_RELAY_NETWORKS: tuple[str, ...] = ()  # explicit only (see above)


def parse_networks(raw: Iterable[str]) -> list[Network]:
    """CIDR strings -> networks ('none' alone: no relay network at all)."""
    items = list(raw)
    if items == ["none"]:
        return []
    return [ipaddress.ip_network(item.strip(), strict=False) for item in items]


def client_ip(peer: object) -> IPAddress | None:
    """The client's IP from an asyncio peername (IPv4-mapped IPv6 unwrapped)."""
    if not isinstance(peer, tuple) or not peer:
        return None
    return _parse_ip(str(peer[0]))


@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str) -> IPAddress | None:
    """Parsed once per client address: a session asks five times (admission, relay check,
    Received header, log line, release), and ipaddress's parser was 2 % of fed's CPU."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(peer: object) -> bool:
    """True for a client connected from the loopback interface."""
    ip = client_ip(peer)
    return ip is not None and ip.is_loopback


@dataclass(frozen=True)
class RelayPolicy:
    """The relay networks; the sender check is the caller's (it needs the directory)."""

    networks: tuple[Network, ...]

    def in_networks(self, peer: object) -> bool:
        """True if the client's address is in a relay network."""
        ip = client_ip(peer)
        return ip is not None and any(ip.version == n.version and ip in n
                                      for n in self.networks)

    def may_relay(self, peer: object, authenticated: bool, sender_is_local: bool) -> bool:
        """The rule of this module's docstring."""
        return authenticated or (sender_is_local and self.in_networks(peer))
