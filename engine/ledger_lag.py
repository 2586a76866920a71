"""How far the Postgres ledger is behind Redis, from the figures the worker publishes in Redis."""

# The worker publishes every second; older than this, its figures are not to be trusted.
worker_stats_stale_ms = 10_000


def outbox_lag_ms(stats: dict[str, int], now_ms: int) -> int | None:
    """The oldest outbox entry at the last sweep, or the last batch's, and never less than the
    worker's silence (both on Redis's clock). None: no worker has ever reported."""
    if "heartbeat_ms" not in stats:
        return None
    silence_ms = max(0, now_ms - stats["heartbeat_ms"])
    lag_ms = max(stats.get("outbox_oldest_age_ms", 0), stats.get("last_lag_ms", 0))
    return max(lag_ms, silence_ms if silence_ms > worker_stats_stale_ms else 0)
