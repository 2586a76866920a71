"""The arq Worker's settings, written out in full (arq's WorkerSettings, as a function of ours).

Queue, cron job names and the health-check key all carry our key prefix, so several deployments
(or test runs) can share one Redis without touching each other's jobs.
"""

import asyncio
import logging
import os
import signal
from typing import Any

from arq.connections import RedisSettings
from arq.cron import cron
from arq.worker import func
from redis.exceptions import RedisError

from credit_engine.engine.config import Settings
from credit_engine.engine.doorbell import adopt_unsharded_hints
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import make_telephony
from credit_engine.engine.vapi_account import VapiAccount
from credit_engine.engine.vapi_calls import VapiPace
from credit_engine.worker import jobs
from credit_engine.worker.background import TimedLoops
from credit_engine.worker.drainer import Drainer
from credit_engine.worker.metrics import METRICS

log = logging.getLogger(__name__)

drainer_stop_timeout_s = 10.0


def _exit_if_drainer_ends(task: "asyncio.Task[None]") -> None:
    """The drain loop (and the timed loops) only end when the worker stops them. If one ends any other way, a worker that
    looks healthy but drains nothing is worse than none: stop, and let the supervisor restart us."""
    if task.cancelled() or getattr(task, "stopping", False):
        return
    error = task.exception()
    log.critical("the outbox drain ended unexpectedly (%r): stopping the worker", error)
    os.kill(os.getpid(), signal.SIGTERM)


async def _stop(runner: Drainer | TimedLoops, task: "asyncio.Task[None] | None") -> bool:
    """Stop a background loop and wait for it (marked, so its ending is not taken for a crash)."""
    if task is None:
        return False
    task.stopping = True  # type: ignore[attr-defined]
    runner.stop()
    try:
        await asyncio.wait_for(task, drainer_stop_timeout_s)
    except TimeoutError:  # stuck on a store that is away: cancelled (what it had not committed is redelivered)
        log.warning("%s did not stop within %.0f s: cancelled", task.get_name(), drainer_stop_timeout_s)
    return True


def _every(seconds: int) -> set[int]:
    return set(range(0, 60, seconds)) if seconds < 60 else {0}


def _vapi_account(rt: Runtime) -> VapiAccount | None:
    """Vapi's API for the settle job and the daily audit, paced for the whole deployment; None
    without VAPI_API_KEY (both then do nothing, and `verify` warns)."""
    settings = rt.settings
    if settings.vapi_api_key is None:
        log.warning("VAPI_API_KEY is not set: silent holds expire without asking Vapi, and no daily audit runs")
        return None
    pace = VapiPace(rt.redis, rt.keys, settings.vapi_api_rps)
    return VapiAccount(settings.vapi_api_key, settings.vapi_base_url, pace=pace.wait_turn)


def worker_options(settings: Settings) -> dict[str, Any]:
    assert settings.redis_url is not None
    keys = Keyspace(settings.key_prefix)

    async def on_startup(ctx: dict[str, Any]) -> None:
        rt = await Runtime.open(settings)
        ctx["rt"] = rt
        ctx["metrics_server"] = METRICS.serve(settings.worker_metrics_host, settings.worker_metrics_port)
        ctx["telephony"] = make_telephony(settings)
        ctx["vapi"] = _vapi_account(rt)
        await ensure_rebuilt(rt)  # before draining anything: Redis may have lost its state
        await adopt_unsharded_hints(rt)  # hints an earlier release filed in one key each
        drainer = Drainer(rt)
        ctx["drainer"] = drainer
        await drainer.sweep()  # entries rung by nobody (a crash before this start) are found now
        task = asyncio.create_task(drainer.run_forever(), name="outbox-drainer")
        task.add_done_callback(_exit_if_drainer_ends)
        ctx["drainer_task"] = task
        loops = TimedLoops(rt)
        ctx["loops"] = loops
        loops_task = asyncio.create_task(loops.run_forever(), name="kill-switch-and-alerts")
        loops_task.add_done_callback(_exit_if_drainer_ends)
        ctx["loops_task"] = loops_task
        log.info("worker started: draining outboxes under prefix %r", settings.key_prefix)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        drainer: Drainer | None = ctx.get("drainer")
        if drainer is not None and await _stop(drainer, ctx.get("drainer_task")):
            try:
                await drainer.publish_stats()
            except (RedisError, OSError) as error:  # stopping while Redis is away: the next worker publishes
                log.warning("could not publish the last stats at shutdown: %s", error)
        loops: TimedLoops | None = ctx.get("loops")
        if loops is not None and await _stop(loops, ctx.get("loops_task")):
            await loops.close()
        vapi: VapiAccount | None = ctx.get("vapi")
        if vapi is not None:
            await vapi.client.aclose()
        rt: Runtime | None = ctx.get("rt")
        if rt is not None:
            await rt.close()
        metrics_server = ctx.get("metrics_server")
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.shutdown)
            metrics_server.server_close()
        log.info("worker stopped")

    def cron_name(name: str) -> str:
        return f"cron:{settings.key_prefix}:{name}"

    return {
        "functions": [func(jobs.drain_org, name=f"{settings.key_prefix}:drain_org", max_tries=3, timeout=300)],
        "cron_jobs": [
            cron(
                jobs.expire_holds,
                name=cron_name("expire_holds"),
                second=_every(settings.worker_expire_interval_s),
                run_at_startup=True,
                timeout=60,
                max_tries=1,
            ),
            cron(
                jobs.settle_holds,
                name=cron_name("settle_holds"),
                second=_every(settings.worker_expire_interval_s),
                run_at_startup=True,
                timeout=300,
                max_tries=1,
            ),
            cron(
                jobs.audit_vapi_daily,
                name=cron_name("audit_vapi_daily"),
                hour={0},
                minute={20},
                second={0},
                timeout=3600,
                max_tries=1,
            ),
            cron(
                jobs.finish_pending_credits,
                name=cron_name("finish_pending_credits"),
                second=_every(settings.worker_expire_interval_s),
                run_at_startup=True,
                timeout=60,
                max_tries=1,
            ),
            cron(
                jobs.sweep_outbox,
                name=cron_name("sweep_outbox"),
                second=_every(settings.worker_sweep_interval_s),
                timeout=120,
                max_tries=1,
            ),
            cron(
                jobs.reschedule_kill_switch,
                name=cron_name("reschedule_kill_switch"),
                second=_every(settings.worker_sweep_interval_s),
                timeout=120,
                max_tries=1,
            ),
            cron(jobs.check_state, name=cron_name("check_state"), second=_every(5), timeout=300, max_tries=1),
            cron(
                jobs.charge_rent,
                name=cron_name("charge_rent"),
                minute=set(range(0, 60, 10)),
                second={30},
                run_at_startup=True,
                timeout=600,
                max_tries=1,
            ),
            cron(
                jobs.finish_abandoned_provisions,
                name=cron_name("finish_abandoned_provisions"),
                second=_every(settings.worker_sweep_interval_s),
                timeout=120,
                max_tries=1,
            ),
        ],
        "redis_settings": RedisSettings.from_dsn(settings.arq_url),
        "queue_name": keys.arq_queue,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "health_check_interval": settings.worker_health_check_interval_s,
        "max_jobs": 10,
        "job_timeout": 300,
        "max_tries": 3,
        "keep_result": 60,
        "poll_delay": 0.5,
        "handle_signals": True,
    }
