"""Prometheus metrics. Counters the hot path already keeps are read at scrape time.

The broker counts in plain integers (`BrokerStats`); a collector turns them
into metric families only when Prometheus asks, so fan-out pays nothing for
metrics. Labels are bounded: reasons and outcomes, never user ids.
Each app has its own registry, so several apps in one process do not clash.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .hub import Hub

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _BrokerCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        broker = self.hub.broker
        s = broker.stats
        yield GaugeMetricFamily(
            "tidings_connections", "Open client connections.", value=len(broker.connections)
        )
        yield GaugeMetricFamily(
            "tidings_users_online",
            "Distinct users with a connection here.",
            value=len(broker.users()),
        )
        for name, doc, value in (
            ("tidings_messages_published", "Events published through this instance.", s.published),
            ("tidings_messages_delivered", "Event deliveries to connections.", s.delivered),
            ("tidings_messages_dropped", "Frames discarded by slow-consumer closes.", s.dropped),
            ("tidings_connects", "Connections opened.", s.connects),
            ("tidings_buffer_overflows", "Connections closed for overflowing.", s.overflows),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        by_reason = CounterMetricFamily(
            "tidings_disconnects", "Connections closed, by reason.", labels=["reason"]
        )
        for reason, count in sorted(s.disconnect_reasons.items()):
            by_reason.add_metric([reason], count)
        yield by_reason


class Metrics:
    """The registry behind `/metrics`, plus the counters the HTTP layer moves."""

    def __init__(self, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_BrokerCollector(hub))
        self.auth_failures = Counter(
            "tidings_auth_failures",
            "Refused credentials, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.publish_requests = Counter(
            "tidings_publish_requests",
            "Publish API requests, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.publishes_accepted = self.publish_requests.labels(
            "accepted"
        )  # the hot one, looked up once
        self.backend_errors = Counter(
            "tidings_backend_errors", "Failed backend operations.", registry=self.registry
        )
        self.delivery_latency = Histogram(
            "tidings_delivery_latency_seconds",
            "Publish-to-fan-out time per event (once per event, not per recipient).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        hub.broker.latency_observer = self.delivery_latency.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
