"""The worker's own Prometheus metrics, served by the worker process itself
(CREDIT_ENGINE_WORKER_METRICS_PORT, 9464 by default, 0 for none).

Counters are real counters, counted where the work is done, so `rate()` works on them and each
worker is its own series (Prometheus sums them); web processes no longer republish these figures
read back from Redis, where N web processes made N copies and a counter shown as a gauge broke
`rate()`. The deployment-wide totals stay in Redis for `credit-engine status` and `verify`."""

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.entries_written = Counter(
            "credit_engine_worker_ledger_entries_written", "Ledger entries this worker wrote", registry=self.registry
        )
        self.entries_redelivered = Counter(
            "credit_engine_worker_ledger_entries_redelivered",
            "Outbox entries this worker found already in the ledger (a re-delivery after a crash), skipped",
            registry=self.registry,
        )
        self.entries_duplicate = Counter(
            "credit_engine_worker_ledger_duplicates",
            "Outbox entries refused as duplicate decisions (kept in ledger_rejects)",
            registry=self.registry,
        )
        self.batches = Counter("credit_engine_worker_drain_batches", "Drain batches committed", registry=self.registry)
        self.drain_errors = Counter(
            "credit_engine_worker_drain_errors", "Drain rounds that failed and were retried", registry=self.registry
        )
        self.events = Counter(
            "credit_engine_worker_events",
            "Kill-switch pushes and alert deliveries (kill_warned, kill_ended, kill_failed_attempts, kill_given_up, "
            "alerts_delivered, alerts_failed, ...), silent holds looked up at Vapi (settle_looked_up, "
            "settle_committed, settle_in_progress, settle_not_found, settle_errors, ...) and the daily audit "
            "(audit_runs, audit_mismatches, audit_failed)",
            ["event"],
            registry=self.registry,
        )
        self.outbox_entries = Gauge(
            "credit_engine_worker_outbox_entries",
            "Entries in all outboxes at this worker's last sweep",
            registry=self.registry,
        )
        self.outbox_oldest_age = Gauge(
            "credit_engine_worker_outbox_oldest_age_seconds",
            "Age of the oldest outbox entry at this worker's last sweep",
            registry=self.registry,
        )

    def count(self, **events: int) -> None:
        for name, n in events.items():
            if n:
                self.events.labels(name).inc(n)

    def serve(self, host: str, port: int) -> Any:
        """Serve /metrics on host:port from a thread of its own; None if off (port 0) or if the port
        is taken: the worker keeps draining and pushing either way (metrics never stop the money)."""
        if port == 0:
            return None
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            log.error("worker metrics not served on %s:%d: %s", host, port, error)
            return None
        log.info("worker metrics on http://%s:%d/metrics", host, port)
        return server


METRICS = WorkerMetrics()  # one worker per process
