"""The plain-number metrics (`PlainCounter`, `PlainHistogram`) read as prometheus_client's own."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tidings.metrics import LATENCY_BUCKETS, PlainCounter, PlainHistogram


def exposition(*collectors: object) -> list[str]:
    """The text format, creation times replaced (they are the moments of creation)."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return re.sub(r"^(\w+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text, flags=re.M).splitlines()


def test_a_plain_counter_is_exposed_as_a_labelled_counter() -> None:
    ours = PlainCounter("t_requests", "Requests, by outcome.", "outcome")
    theirs = Counter("t_requests", "Requests, by outcome.", ["outcome"], registry=None)
    for outcome in ["accepted", "forbidden", "accepted", "技术"]:
        ours.inc(outcome)
        theirs.labels(outcome).inc()
    assert exposition(ours) == exposition(theirs)


def test_a_plain_histogram_is_exposed_as_a_histogram() -> None:
    doc = "Publish-to-fan-out time."
    ours = PlainHistogram("t_latency_seconds", doc, LATENCY_BUCKETS)
    theirs = Histogram("t_latency_seconds", doc, buckets=LATENCY_BUCKETS, registry=None)
    for value in [0.0, 0.0001, 0.0005, 0.00051, 0.003, 2.5, 2.6, 100.0]:  # bounds are inclusive
        ours.observe(value)
        theirs.observe(value)
    assert exposition(ours) == exposition(theirs)
    assert ours.counts == [3, 1, 0, 1] + [0] * 7 + [1, 2]
