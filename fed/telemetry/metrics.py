"""Prometheus metrics of fed: what a mail admin graphs and alerts on.

Why ``prometheus_client``: it is the reference implementation of the text exposition
format (escaping, ``# HELP``/``# TYPE``, histogram ``_bucket``/``_sum``/``_count``), and
its custom-collector hook lets queue gauges be computed from the store at scrape time
instead of being kept in step with every queue change by hand.

Two kinds of numbers:

- *Events* (counters, a histogram) are counted where they happen, through the small
  ``count_*`` hooks below: SMTP acceptance (``server.py``), delivery outcomes
  (``count_delivery``, one call where delivery records an attempt's result). They start
  at zero when fed starts, as Prometheus counters do.
- *State* (gauges: queue depth per destination, held recipients, oldest hold age) is read
  from the store on each scrape by ``StateCollector``, so it is right after a restart.

One registry per process (``REGISTRY``), served on ``GET /metrics`` by ``control.py``.

Every sample carries a ``node`` label (this node's name, ``set_node``): with
``fed serve --processes N`` or several machines, each node is scraped on its own control
port, and the label keeps their series apart even where the scrape's ``instance`` label
would not say which node it was (a port renumbered, a node moved); sum over ``node`` for
the whole group. It is added at exposition (``_NodeLabelled``) because the node name is
only known once ``fed serve`` started, after the collectors were created.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
# The classic text format every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ACCEPTED = Counter("fed_accepted", "Messages accepted over SMTP (spooled, 250 sent)",
                   registry=REGISTRY)
ACCEPTED_BYTES = Counter("fed_accepted_bytes", "Bytes of messages accepted over SMTP",
                         registry=REGISTRY)
REFUSED = Counter("fed_smtp_refused", "SMTP recipients or messages refused, by reply code",
                  ["code"], registry=REGISTRY)
DELIVERED = Counter("fed_delivered", "Recipient deliveries that got a 2xx", ["destination"],
                    registry=REGISTRY)
DEFERRED = Counter("fed_deferred", "Delivery attempts that failed temporarily (retry later)",
                   ["destination"], registry=REGISTRY)
SYSTEM_REFUSALS = Counter(
    "fed_system_refusals", "5xx answers of a managed system for an address fed's directory "
    "places there (deferred and retried, not bounced: mailferry and the system disagree)",
    ["destination"], registry=REGISTRY)
BOUNCED = Counter("fed_bounced", "Recipients refused for good (5xx: shunted or bounced)",
                  ["destination"], registry=REGISTRY)
QUARANTINED = Counter("fed_quarantined", "Queue files set aside in spool/quarantine (unreadable "
                      "or corrupt), by where it was found (start-up, delivery)", ["where"],
                      registry=REGISTRY)
LATENCY = Histogram(
    "fed_delivery_latency_seconds", "From acceptance to successful delivery, per recipient",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
    registry=REGISTRY,
)


def count_accepted(size: int) -> None:
    """A message was spooled and acknowledged."""
    ACCEPTED.inc()
    ACCEPTED_BYTES.inc(size)


def count_refused(code: str) -> None:
    """A recipient or a message was refused with this SMTP code."""
    REFUSED.labels(code=code).inc()


def queued_at(queue_id: str) -> float | None:
    """The time encoded in a queue id (``queuefile.new_queue_id``: when it was made, for a
    blank before its message came; delivery passes the arrival time instead), if any."""
    try:
        return int(queue_id[:14], 16) / 1e6
    except ValueError:
        return None


def count_delivery(result: str, destination: str | None, queue_id: str,
                   received_at: float | None = None) -> None:
    """One recorded delivery outcome: 'delivered', 'deferred', 'refused' (a managed
    system's 5xx, deferred too), 'shunted'/'bounced'."""
    dest = destination or "unknown"
    if result == "delivered":
        DELIVERED.labels(destination=dest).inc()
        start = received_at if received_at is not None else queued_at(queue_id)
        if start is not None:
            LATENCY.observe(max(0.0, time.time() - start))
    elif result in ("deferred", "refused"):
        DEFERRED.labels(destination=dest).inc()
        if result == "refused":
            SYSTEM_REFUSALS.labels(destination=dest).inc()
    elif result in ("shunted", "bounced"):
        BOUNCED.labels(destination=dest).inc()


def count_quarantined(where: str) -> None:
    """A queue file went to quarantine (``spool.py``)."""
    QUARANTINED.labels(where=where).inc()


@dataclass
class QueueState:
    """What the state gauges show, as read from the store."""

    depth: dict[str, int] = field(default_factory=dict)  # destination -> pending rcpts
    messages: int = 0
    held_recipients: int = 0
    holds: int = 0
    oldest_hold: float | None = None  # epoch seconds
    admin_held_messages: int = 0
    oldest_admin_hold: float | None = None
    connections: int = 0
    quarantined: int = 0  # messages in spool/quarantine


class StateCollector(Collector):
    """Gauges computed from a fresh ``QueueState`` at every scrape."""

    def __init__(self, read: Callable[[], QueueState]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges (runs on the event loop thread, like every store read)."""
        state = self.read()
        now = time.time()
        depth = GaugeMetricFamily("fed_queue_depth", "Pending recipients per destination "
                                  "(system, or domain for relayed mail)",
                                  labels=["destination"])
        for destination, n in sorted(state.depth.items()):
            depth.add_metric([destination], n)
        yield depth
        yield GaugeMetricFamily("fed_queue_messages", "Messages in the queue",
                                value=state.messages)
        yield GaugeMetricFamily("fed_held_recipients",
                                "Pending recipients whose address is held",
                                value=state.held_recipients)
        yield GaugeMetricFamily("fed_holds", "Held addresses", value=state.holds)
        yield GaugeMetricFamily(
            "fed_hold_oldest_age_seconds", "Age of the oldest address hold (0: none)",
            value=0.0 if state.oldest_hold is None else max(0.0, now - state.oldest_hold))
        yield GaugeMetricFamily("fed_admin_held_messages",
                                "Queue messages put on hold by an admin",
                                value=state.admin_held_messages)
        yield GaugeMetricFamily(
            "fed_admin_hold_oldest_age_seconds",
            "Age of the oldest admin hold of a queue message (0: none)",
            value=0.0 if state.oldest_admin_hold is None
            else max(0.0, now - state.oldest_admin_hold))
        yield GaugeMetricFamily("fed_smtp_connections", "Open SMTP connections",
                                value=state.connections)
        yield GaugeMetricFamily("fed_quarantine_messages",
                                "Messages in quarantine, waiting for an admin "
                                "(fed queue quarantine)", value=state.quarantined)


_state: StateCollector | None = None
_node: str | None = None


def set_node(name: str) -> None:
    """The node name every exposed sample is labelled with."""
    global _node
    _node = name


class _NodeLabelled:
    """The registry's metrics with ``node="<name>"`` added to every sample."""

    def __init__(self, node: str) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """Copies of the registry's metrics, relabelled."""
        for family in REGISTRY.collect():
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [s._replace(labels={**s.labels, "node": self.node})
                            for s in family.samples]
            yield copy


def install_state(read: Callable[[], QueueState]) -> None:
    """Register (or replace) the state reader of this process."""
    global _state
    if _state is not None:
        REGISTRY.unregister(_state)
    _state = StateCollector(read)
    REGISTRY.register(_state)


def exposition() -> bytes:
    """The metrics in Prometheus text format."""
    if _node is None:
        return generate_latest(REGISTRY)
    return generate_latest(_NodeLabelled(_node))
