"""arq job functions. Each takes arq's ctx; the runtime and drainer are put there at startup."""

import logging
from typing import Any

from credit_engine.engine import provisioning, rent
from credit_engine.engine.credits import apply_pending_credits
from credit_engine.engine.expiry import expire_due_holds
from credit_engine.engine.killswitch import reschedule_live_orgs
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import repair_org
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from credit_engine.worker.drainer import Drainer

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
