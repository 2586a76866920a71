"""arq job functions. Each takes arq's ctx; the runtime and drainer are put there at startup."""

import logging
from typing import Any

from credit_engine.engine import provisioning, rent
from credit_engine.engine.audit import audit_previous_day
from credit_engine.engine.credits import apply_pending_credits
from credit_engine.engine.expiry import expire_due_holds
from credit_engine.engine.killswitch import reschedule_live_orgs
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import repair_org
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.settle import settle_silent_holds
from credit_engine.engine.vapi_account import VapiAccount, VapiError
from credit_engine.worker.drainer import Drainer
from credit_engine.worker.metrics import METRICS

log = logging.getLogger(__name__)

Ctx = dict[str, Any]


def _rt(ctx: Ctx) -> Runtime:
    rt = ctx["rt"]
    assert isinstance(rt, Runtime)
    return rt


async def reschedule_kill_switch(ctx: Ctx) -> dict[str, int]:
    """The backstop for a depletion moment whose ZADD was lost (a process killed after its script)."""
    return {"filed": await reschedule_live_orgs(_rt(ctx))}


async def expire_holds(ctx: Ctx) -> dict[str, int]:
    report = await expire_due_holds(_rt(ctx))
    return report.__dict__


async def finish_pending_credits(ctx: Ctx) -> dict[str, int]:
    rt = _rt(ctx)
    report = await apply_pending_credits(rt)
    for org_id in sorted(report.too_old_orgs):
        # Too old to apply by key alone (Redis may have pruned its record): rewrite the org from
        # Postgres, whose balance already includes the credit.
        outcome = await repair_org(rt, org_id)
        log.warning("repaired org %s for a credit pending too long: %s", org_id, outcome.name)
    return {"applied": report.applied, "failed": report.failed, "too_old": report.too_old}


async def sweep_outbox(ctx: Ctx) -> int:
    drainer = ctx["drainer"]
    assert isinstance(drainer, Drainer)
    return await drainer.sweep()


async def check_state(ctx: Ctx) -> bool:
    """Rebuild Redis from Postgres if it lost its state while we were running (a restart)."""
    report = await ensure_rebuilt(_rt(ctx))
    return report.rebuilt_here


async def finish_abandoned_provisions(ctx: Ctx) -> int:
    rt = _rt(ctx)
    return await provisioning.finish_abandoned_provisions(rt, ctx["telephony"], rt.settings.phone_number_pence)


async def charge_rent(ctx: Ctx) -> dict[str, Any]:
    """Monthly phone-number rent (engine/rent.py): idempotent per number and month, so running it
    every few minutes costs one query when every number has paid."""
    report = await rent.charge_rent(_rt(ctx), ctx["telephony"])
    return report.__dict__


async def drain_org(ctx: Ctx, org_id: str) -> int:
    """On demand (e.g. `arq` enqueue from an operator tool): drain one org's outbox completely."""
    return await drain_org_fully(_rt(ctx), org_id)


def _vapi(ctx: Ctx) -> VapiAccount | None:
    """The Vapi client the worker opened at start (VAPI_API_KEY set), paced; None without a key."""
    account = ctx.get("vapi")
    assert account is None or isinstance(account, VapiAccount)
    return account


async def _count(rt: Runtime, **counts: int) -> None:
    """This worker's /metrics counters, and the deployment's totals in Redis (as the timed loops count)."""
    nonzero = {name: n for name, n in counts.items() if n}
    if not nonzero:
        return
    METRICS.count(**nonzero)
    async with rt.redis.pipeline(transaction=False) as pipe:
        for name, n in nonzero.items():
            pipe.hincrby(rt.keys.worker_counters, name, n)
        await pipe.execute()


async def settle_holds(ctx: Ctx) -> dict[str, int]:
    """Silent holds looked up at Vapi before they expire (engine/settle.py); as many a run as the
    pace allows between two runs. Without VAPI_API_KEY: nothing (holds expire as they always did)."""
    account = _vapi(ctx)
    if account is None:
        return {}
    rt = _rt(ctx)
    report = await settle_silent_holds(rt, account, rt.settings.vapi_api_rps * rt.settings.worker_expire_interval_s)
    await _count(rt, **report.counters())
    return report.__dict__


async def audit_vapi_daily(ctx: Ctx) -> dict[str, int]:
    """Yesterday's calls against Vapi's (engine/audit.py): alerts and an ERROR line on mismatches."""
    account = _vapi(ctx)
    if account is None:
        return {}
    rt = _rt(ctx)
    try:
        report = await audit_previous_day(rt, account)
    except VapiError as error:
        log.error("daily audit against Vapi failed: %s", error)
        await _count(rt, audit_failed=1)
        return {"failed": 1}
    await _count(rt, audit_runs=1, audit_mismatches=len(report.mismatches))
    return {"vapi_calls": report.vapi_calls, "compared": report.compared, "mismatches": len(report.mismatches)}
