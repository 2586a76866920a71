"""Liveness, readiness and metrics."""

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from engine.clock import redis_now_ms
from engine.ledger_lag import outbox_lag_ms
from webapp.context import AppContext, context
from webapp.responses import json_response


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def _worker_stats(ctx: AppContext) -> dict[str, int]:
    raw = await ctx.rt.redis.hgetall(ctx.rt.keys.worker_stats)
    return {name: int(value) for name, value in raw.items()}


async def readyz(request: Request) -> Response:
    """200 only when Redis and Postgres answer, Redis holds the rebuilt state, and the ledger is
    not further behind than CREDIT_ENGINE_READINESS_OUTBOX_LAG_S_MAX."""
    ctx = context(request)
    checks: dict[str, Any] = {}
    try:
        await ctx.rt.redis.ping()
        checks["redis"] = "ok"
    except Exception as error:  # any failure means not ready; the reason is reported
        checks["redis"] = f"unreachable: {type(error).__name__}"
    try:
        await ctx.rt.pg.fetchval("SELECT 1", timeout=2)
        checks["postgres"] = "ok"
    except Exception as error:
        checks["postgres"] = f"unreachable: {type(error).__name__}"
    checks["state"] = "ok" if ctx.guard.ready else "restoring from the ledger"
    if checks["redis"] == "ok":
        lag_ms = outbox_lag_ms(await _worker_stats(ctx), await redis_now_ms(ctx.rt.redis))
        limit_ms = ctx.settings.readiness_outbox_lag_s_max * 1000
        checks["outbox_lag_ms"] = lag_ms
        checks["outbox"] = "no worker has reported yet" if lag_ms is None else ("ok" if lag_ms <= limit_ms else "behind")
    ready = all(checks.get(name) == "ok" for name in ("redis", "postgres", "state", "outbox"))
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)


async def metrics(request: Request) -> Response:
    ctx = context(request)
    try:
        stats = await _worker_stats(ctx)
        now_ms = await redis_now_ms(ctx.rt.redis)
    except Exception:
        stats, now_ms = {}, 0
    if stats:
        ctx.metrics.outbox_entries.set(stats.get("outbox_entries", 0))
        ctx.metrics.outbox_lag.set((outbox_lag_ms(stats, now_ms) or 0) / 1000)
        ctx.metrics.ledger_writes.set(stats.get("entries_written", 0))
        ctx.metrics.ledger_duplicates.set(stats.get("entries_duplicate", 0))
        ctx.metrics.worker_heartbeat_age.set(max(0, now_ms - stats.get("heartbeat_ms", now_ms)) / 1000)
    try:
        counters = await ctx.rt.redis.hgetall(ctx.rt.keys.worker_counters)
    except Exception:
        counters = {}
    for event, count in counters.items():
        ctx.metrics.worker_events.labels(event).set(int(count))
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
