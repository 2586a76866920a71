"""Expire holds whose calls never reported.

Candidates come from Postgres (call_holds: live, expires_at passed); the decision is Redis's:
hold_release.lua in 'expire' mode re-checks the expiry against the hold as Redis has it (a
check may have pushed it later, the call may have been committed meanwhile) and resolves the
hold at most once, charging the time the call is known to have run.

One batch per run: an expired row stays 'live' in Postgres until the worker drains the expiry's
hold event, so the cron's next run sees the next batch.
"""

import logging
from dataclasses import dataclass

from credit_engine.engine.holds import expire_call
from credit_engine.engine.restore import restore_org_if_absent
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.timeutil import dt_from_ms

log = logging.getLogger(__name__)

expire_batch_size_max = 500


@dataclass
class ExpiryReport:
    candidates: int = 0
    expired: int = 0
    charged_pence: int = 0
    not_due: int = 0  # Redis has a later expiry than Postgres (an extension not drained yet)
    resolved_meanwhile: int = 0  # committed or released; its event is on the way to Postgres
    missing_in_redis: int = 0  # Redis lost the hold: the Postgres row is closed as released
    org_unknown: int = 0  # Redis lost the whole org: restored, expired on the next run


async def expire_due_holds(rt: Runtime) -> ExpiryReport:
    report = ExpiryReport()
    now_ms = await rt.clock.now_ms(rt.redis)
    rows = await rt.pg.fetch(
        """
        SELECT org_id, call_id FROM call_holds
        WHERE status = 'live' AND expires_at <= $1
        ORDER BY expires_at LIMIT $2
        """,
        dt_from_ms(now_ms),
        expire_batch_size_max,
    )
    report.candidates = len(rows)
    for row in rows:
        resolution = await expire_call(rt, row["org_id"], row["call_id"])
        if resolution.outcome == Outcome.ok:
            report.expired += 1
            report.charged_pence += resolution.charged_pence
            log.info(
                "expired hold of call %s (org %s): charged %dp", row["call_id"], row["org_id"], resolution.charged_pence
            )
        elif resolution.outcome == Outcome.not_expired:
            report.not_due += 1
        elif resolution.outcome == Outcome.org_unknown:
            report.org_unknown += 1
            await restore_org_if_absent(rt, row["org_id"])  # the next run expires it
        elif resolution.outcome == Outcome.hold_not_found:
            if await _on_its_way(rt, row["org_id"], row["call_id"]):
                # Its resolution is in the org's outbox, on its way to Postgres (its Redis record
                # pruned meanwhile, if Postgres was away longer than the idempotency window): the
                # drain settles the row.
                report.resolved_meanwhile += 1
                continue
            report.missing_in_redis += 1
            await _close_missing(rt, row["org_id"], row["call_id"])
        else:
            report.resolved_meanwhile += 1
    return report


outbox_scan_page = 1_000


async def _on_its_way(rt: Runtime, org_id: str, call_id: str) -> bool:
    """Whether the org's outbox holds an event of this call (read page by page: the outbox is
    bounded by CREDIT_ENGINE_OUTBOX_PER_ORG_MAX, and this runs only for a row Redis does not know)."""
    stream = rt.keys.org(org_id).outbox
    after = "-"
    for _ in range(rt.settings.outbox_per_org_max // outbox_scan_page + 1):
        entries = await rt.redis.xrange(stream, after, "+", count=outbox_scan_page)
        if any(fields.get("t") == "H" and fields.get("c") == call_id for _, fields in entries):
            return True
        if len(entries) < outbox_scan_page:
            return False
        after = "(" + entries[-1][0]
    return True  # longer than its bound: say yes, the next run looks again


async def _close_missing(rt: Runtime, org_id: str, call_id: str) -> None:
    """Redis, the authority on holds, has neither the hold nor its resolution, and nothing of the
    org is on its way to Postgres: it lost them (a Redis restart before the hold's events were
    rebuilt). Close the stale row so it is not restored as a live hold; nothing was charged,
    which the log says loudly."""
    log.warning(
        "hold of call %s (org %s) is live in postgres but unknown to redis: closing it as released", call_id, org_id
    )
    await rt.pg.execute(
        """
        UPDATE call_holds SET status = 'released', charged_pence = 0, billed_seconds = 0,
               resolved_at = now(), updated_at = now()
        WHERE org_id = $1 AND call_id = $2 AND status = 'live'
        """,
        org_id,
        call_id,
    )
