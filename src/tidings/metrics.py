"""Prometheus metrics. Counters the hot path already keeps are read at scrape time.

The broker counts in plain integers (`BrokerStats`); a collector turns them
into metric families only when Prometheus asks, so fan-out pays nothing for
metrics. What moves once per publish (its outcome, the delivery latency) is
counted the same way (`PlainCounter`, `PlainHistogram`). Labels are bounded:
reasons and outcomes, never user ids. Each app has its own registry, so
several apps in one process do not clash.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import cast

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .hub import Hub

_le = cast(Callable[[float], str], floatToGoString)  # a bucket bound as Prometheus spells it
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


class PlainCounter(Collector):
    """A counter by one label in a plain dict, for the event loop's thread: `inc` is a
    dict update (prometheus_client's takes a lock). Exposed as its `Counter` would be."""

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.counts: dict[str, int] = {}
        self.created: dict[str, float] = {}

    def inc(self, value: str) -> None:
        counts = self.counts
        if value in counts:
            counts[value] += 1
        else:
            counts[value] = 1
            self.created[value] = time.time()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, count in list(self.counts.items()):
            family.add_metric([value], count, created=self.created[value])
        yield family


class PlainHistogram(Collector):
    """A histogram in plain numbers, for the event loop's thread: `observe` is a bisect
    and two additions (prometheus_client's takes a lock twice). Exposed as its
    `Histogram` would be."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name, self.doc = name, doc
        self.bounds = (*buckets, math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative = accumulate(list(self.counts))
        buckets = [(_le(b), c) for b, c in zip(self.bounds, cumulative, strict=True)]
        family = HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)
        family.add_sample(self.name + "_created", {}, self.created)
        yield family


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
        # Once per publish: plain numbers (below), not prometheus_client's locked values.
        self.publish_requests = PlainCounter(
            "tidings_publish_requests", "Publish API requests, by outcome.", "outcome"
        )
        self.registry.register(self.publish_requests)
        self.backend_errors = Counter(
            "tidings_backend_errors", "Failed backend operations.", registry=self.registry
        )
        self.delivery_latency = PlainHistogram(
            "tidings_delivery_latency_seconds",
            "Publish-to-fan-out time per event (once per event, not per recipient).",
            LATENCY_BUCKETS,
        )
        self.registry.register(self.delivery_latency)
        hub.broker.latency_observer = self.delivery_latency.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
