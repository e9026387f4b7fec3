"""Prometheus metrics (``GET /metrics``), one registry per process.

Counters and histograms are updated on the request path; pool and billing gauges (headroom,
in-flight, outstanding holds) are read from Redis and the database when scraped, so they are the
same on every relay process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "poolrelay_requests",
            "Customer requests by route, model and status",
            ["route", "model", "status"],
            registry=r,
        )
        self.overhead = Histogram(
            "poolrelay_relay_overhead_seconds",
            "Time the relay adds before the upstream call (auth, policy, hold, scheduling)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "poolrelay_upstream_latency_seconds",
            "Upstream time to response headers",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "poolrelay_time_to_first_byte_seconds",
            "Request start to the first response byte from the upstream",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "poolrelay_request_duration_seconds",
            "Whole request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "poolrelay_failovers", "Attempts moved to another account", ["reason"], registry=r
        )
        self.quarantines = Counter(
            "poolrelay_quarantines", "Accounts quarantined", ["reason"], registry=r
        )
        self.charged = Counter(
            "poolrelay_charged_microusd", "Micro-USD charged to customers", registry=r
        )
        self.charged_without_hold = Counter(
            "poolrelay_charged_without_hold",
            "Delivered answers charged after their hold had been released (the balance may dip"
            " below zero)",
            registry=r,
        )
        self.hold_extensions = Counter(
            "poolrelay_hold_extensions",
            "Extensions of a stream's hold by outcome: ok, refused (the balance could not cover"
            " it: the stream was ended), failed (the database did not answer)",
            ["outcome"],
            registry=r,
        )
        self.discrepancies = Gauge(
            "poolrelay_reconciliation_discrepancies",
            "Differences found by the last reconciliation",
            registry=r,
        )
        self.billing_retries = Gauge(
            "poolrelay_billing_writes_retrying",
            "Settlements and uncertain holds this process is retrying in the background"
            " (the database did not take them)",
            ["kind"],
            registry=r,
        )
        self.holds_settled = Counter(
            "poolrelay_reconciliation_holds",
            "Left-behind holds finished by reconciliation",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "poolrelay_queue_waiting",
            "Requests of this process waiting for a concurrency slot, by kind (pool: an"
            " account's max_concurrency; key: the key's max_concurrency)",
            ["kind"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "poolrelay_queue_wait_seconds",
            "Time a request waited for a concurrency slot (granted or not), by kind and result",
            ["kind", "result"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for kind in ("pool", "key"):  # scraped as 0 before the first wait
            self.queue_depth.labels(kind)

        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}

    def request_done(
        self, route: str, model: str, status: str, duration: float, ttfb: float | None
    ) -> None:
        """One finished request (labelled children cached: ``labels()`` is not free)."""
        key = (route, model, status)
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 10_000:
                self._children.clear()
            children = self._children[key] = (
                self.requests.labels(route, model, status),
                self.duration.labels(route),
                self.ttfb.labels(route),
            )
        counter, durations, ttfbs = children
        counter.inc()
        durations.observe(duration)
        if ttfb is not None:
            ttfbs.observe(ttfb)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class Snapshot(Collector):
    """Gauges gathered right before a scrape (see :func:`app.main` ``/metrics``)."""

    def __init__(self) -> None:
        self.accounts: list[tuple[str, int, dict[str, float]]] = []
        self.holds_outstanding = 0
        self.held_micros = 0
        self.taken_at = 0.0

    def collect(self) -> Iterable[Metric]:
        headroom = GaugeMetricFamily(
            "poolrelay_account_headroom_ratio",
            "remaining/limit per rate-limit family",
            labels=["account", "family"],
        )
        in_flight = GaugeMetricFamily(
            "poolrelay_account_in_flight", "Leased requests per account", labels=["account"]
        )
        for name, leases, families in self.accounts:
            in_flight.add_metric([name], leases)
            for family, ratio in families.items():
                headroom.add_metric([name, family], ratio)
        yield headroom
        yield in_flight
        yield GaugeMetricFamily(
            "poolrelay_holds_outstanding", "Open holds", value=self.holds_outstanding
        )
        yield GaugeMetricFamily(
            "poolrelay_held_microusd", "Micro-USD held by open holds", value=self.held_micros
        )
        yield GaugeMetricFamily(
            "poolrelay_snapshot_age_seconds",
            "Age of the pool snapshot",
            value=time.time() - self.taken_at,
        )
