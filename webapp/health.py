"""Liveness, readiness and metrics."""

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine.clock import redis_now_ms
from credit_engine.engine.db import ping_postgres
from credit_engine.engine.ledger_lag import outbox_lag_ms
from credit_engine.engine.runtime import ping_redis
from credit_engine.engine.worker_health import worker_stats
from credit_engine.webapp.context import AppContext, context
from credit_engine.webapp.responses import json_response


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when this process can decide: Redis answers and holds the rebuilt state. Nothing else.

    The engine decides from Redis alone: through a Postgres outage the outbox holds the ledger's
    entries, and through a stopped worker too. Were either in the status code, a load balancer that
    honours readiness would take every web process out of rotation at once, and Vapi's webhooks
    (which must get an answer) would fail for a fault the engine is built to ride out. So the
    health of Postgres, the worker and the ledger's lag is reported in the body (and in /metrics and
    `credit-engine verify`), never in the status code."""
    ctx = context(request)
    checks: dict[str, Any] = {}
    try:
        await ping_redis(ctx.rt.redis)
        checks["redis"] = "ok"
    except Exception as error:  # any failure means not ready; the reason is reported
        checks["redis"] = f"unreachable: {type(error).__name__}"
    checks["state"] = "ok" if ctx.guard.ready else "restoring from the ledger"
    checks["postgres"] = await _postgres_check(ctx)
    if checks["redis"] == "ok":
        try:
            lag_ms = outbox_lag_ms(await worker_stats(ctx.rt.redis, ctx.rt.keys), await redis_now_ms(ctx.rt.redis))
        except Exception as error:  # Redis went away between the ping and these reads
            checks["redis"] = f"unreachable: {type(error).__name__}"
        else:
            limit_ms = ctx.settings.readiness_outbox_lag_s_max * 1000
            checks["outbox_lag_ms"] = lag_ms
            checks["outbox"] = (
                "no worker has reported yet" if lag_ms is None else ("ok" if lag_ms <= limit_ms else "behind")
            )
    ready = all(checks[name] == "ok" for name in READY_WHEN)
    degraded = [name for name in ("postgres", "outbox") if checks.get(name, "ok") != "ok"]
    body = {"status": "ready" if ready else "not_ready", "degraded": degraded, "checks": checks}
    return json_response(body, 200 if ready else 503)


READY_WHEN = ("redis", "state")
postgres_check_timeout_s = 1.0  # a probe's own timeout is a few seconds: /readyz answers well within it  # what the status code says; the rest is reported, never decisive


async def _postgres_check(ctx: AppContext) -> str:
    try:
        await ping_postgres(ctx.rt.pg, postgres_check_timeout_s)  # never answering is unreachable too
        return "ok"
    except Exception as error:
        return f"unreachable: {type(error).__name__}"


async def metrics(request: Request) -> Response:
    ctx = context(request)
    try:
        stats = await worker_stats(ctx.rt.redis, ctx.rt.keys)
        now_ms = await redis_now_ms(ctx.rt.redis)
    except Exception:
        stats, now_ms = {}, 0
    if stats:
        ctx.metrics.outbox_entries.set(stats.get("outbox_entries", 0))
        ctx.metrics.outbox_lag.set((outbox_lag_ms(stats, now_ms) or 0) / 1000)
        ctx.metrics.worker_heartbeat_age.set(max(0, now_ms - stats.get("heartbeat_ms", now_ms)) / 1000)
    ctx.metrics.postgres_up.set(1 if await _postgres_check(ctx) == "ok" else 0)
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
