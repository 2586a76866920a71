"""Prometheus metrics of one web process, plus readings of the deployment's shared state taken from
Redis on scrape (ledger lag, outbox size, worker heartbeat: gauges, the same from any process). The
worker's counters are the worker's own (worker/metrics.py), never republished here."""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "credit_engine_decisions",
            "Money decisions by operation and outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "credit_engine_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.webhooks = Counter(
            "credit_engine_vapi_messages",
            "Vapi messages by type and result",
            ["type", "result"],
            registry=self.registry,
        )
        self.forwarded = Counter(
            "credit_engine_forwarded_messages",
            "Messages forwarded to platforms' servers, by result (relayed, delivered, retried, dropped_*, ...)",
            ["result"],
            registry=self.registry,
        )
        self.outbox_entries = Gauge(
            "credit_engine_outbox_entries", "Entries in all outboxes at the worker's last sweep", registry=self.registry
        )
        self.outbox_lag = Gauge(
            "credit_engine_outbox_lag_seconds", "Age of the oldest entry not yet in the ledger", registry=self.registry
        )
        self.postgres_up = Gauge(
            "credit_engine_postgres_up",
            "1 if this web process's Postgres answered at this scrape, else 0",
            registry=self.registry,
        )
        self.worker_heartbeat_age = Gauge(
            "credit_engine_worker_heartbeat_age_seconds",
            "Seconds since the worker last reported",
            registry=self.registry,
        )

        self._children: dict[tuple[str, ...], Any] = {}

    def forward(self, result: str) -> None:
        self._child(self.forwarded, "forwarded", result).inc()

    def decision(self, operation: str, outcome: str) -> None:
        self._child(self.decisions, "decision", operation, outcome).inc()

    def observe_latency(self, endpoint: str, seconds: float) -> None:
        self._child(self.latency, "latency", endpoint).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's labels() takes a lock and builds a key on every call; the hot
        # endpoints ask for the same few children thousands of times a second.
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = metric.labels(*labels[1:])
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
