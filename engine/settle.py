"""Settle silent holds from Vapi's own record of the call, before they expire.

A live hold whose call should have reported and has not (its report was due, at the end of its
funded time or at its `ended` status, `settle_report_grace_s` ago) is looked up with Vapi's
`GET /call/{id}`:

- Vapi says `ended`, with `startedAt` and `endedAt`: the call is committed exactly as its
  end-of-call-report would have committed it (engine/holds.commit_call, the same billed seconds
  from the same times, the same ledger key `<org>/call/<call>/charge` and kind `call_charge`). A
  real report arriving afterwards bills the same seconds: a replay, never a second charge. Vapi
  says `ended` without times (the call never connected): resolved as a report without times
  would be (release_call: the time the engine saw, usually none).
- Vapi says anything else (queued, ringing, in-progress, forwarding): the call runs, so its hold
  stays, and with it the kill switch's hold on the call.
- Vapi does not know the call (404) or cannot answer (5xx, timeouts, after the client's retries):
  nothing changes. The hold expires as it always did (engine/expiry.py), charging the time the
  engine knows the call ran. Nothing is ever released for want of an answer.

Each call is looked up at most once per `settle_recheck_s` across every worker (a Redis key with
that TTL, set before the lookup), and every request waits its turn under the deployment's
CREDIT_ENGINE_VAPI_API_RPS (engine/vapi_calls.VapiPace). A run looks up at most `lookups_max`
calls, holds nearest their expiry first. Without VAPI_API_KEY nothing is looked up: holds expire
as they always did, and `credit-engine verify` says so.
"""

import logging
from dataclasses import dataclass

from credit_engine.engine import limits
from credit_engine.engine.decisions import restoring
from credit_engine.engine.holds import commit_call, release_call
from credit_engine.engine.idempotency import DIAL_RESERVATION_PREFIX
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.timeutil import dt_from_ms
from credit_engine.engine.vapi_account import VapiAccount, VapiError
from credit_engine.engine.vapi_calls import VapiCallRecord

log = logging.getLogger(__name__)

candidates_per_lookup = 4  # rows read per lookup allowed (some were looked up recently and are skipped)

# A hold under a dial's reservation id is no Vapi call (engine/dial.py): Vapi knows it by the id
# the hold is adopted under, so it is never looked up.
CANDIDATES_SQL = f"""
SELECT org_id, call_id FROM call_holds
WHERE status = 'live' AND expires_at <= $1 AND call_id NOT LIKE '{DIAL_RESERVATION_PREFIX}%'
ORDER BY expires_at LIMIT $2
"""


@dataclass
class SettleReport:
    candidates: int = 0
    looked_up: int = 0
    committed: int = 0  # billed at Vapi's times
    charged_pence: int = 0
    released: int = 0  # ended at Vapi without times: resolved as a report without times
    in_progress: int = 0  # still running at Vapi: kept
    not_found: int = 0  # Vapi does not know it: kept (it expires as before)
    errors: int = 0  # Vapi did not answer: kept
    resolved_meanwhile: int = 0  # its report (or the expiry) came first
    recently_looked_up: int = 0

    def counters(self) -> dict[str, int]:
        """The worker's counters (settle_<name>)."""
        names = ("looked_up", "committed", "released", "in_progress", "not_found", "errors", "resolved_meanwhile")
        return {f"settle_{name}": getattr(self, name) for name in names}


def report_grace_ms(hold_report_slack_ms: int) -> int:
    """How long after a report was due the hold is looked up: `settle_report_grace_s`, but never
    so late that the hold expires first (at most half the slack)."""
    return min(limits.settle_report_grace_s * 1000, hold_report_slack_ms // 2)


async def settle_silent_holds(rt: Runtime, account: VapiAccount, lookups_max: int) -> SettleReport:
    assert lookups_max >= 1
    report = SettleReport()
    now_ms = await rt.clock.now_ms(rt.redis)
    slack_ms = rt.settings.hold_report_slack_ms
    # expires_at = when the report was due + slack; due + grace has passed when this holds.
    due_ms = now_ms + slack_ms - report_grace_ms(slack_ms)
    rows = await rt.pg.fetch(CANDIDATES_SQL, dt_from_ms(due_ms), lookups_max * candidates_per_lookup)
    report.candidates = len(rows)
    for row in rows:
        if report.looked_up >= lookups_max:
            break
        if not await _claim(rt, row["call_id"]):
            report.recently_looked_up += 1
            continue
        report.looked_up += 1
        await _settle_one(rt, account, row["org_id"], row["call_id"], report)
    return report


async def _claim(rt: Runtime, call_id: str) -> bool:
    """Whether this worker may look the call up now (nobody did within settle_recheck_s)."""
    key = rt.keys.settle_looked_up(call_id)
    return bool(await rt.redis.set(key, "1", nx=True, px=limits.settle_recheck_s * 1000))


async def _settle_one(rt: Runtime, account: VapiAccount, org_id: str, call_id: str, report: SettleReport) -> None:
    try:
        record = await account.call(call_id)
    except (VapiError, TimeoutError) as error:
        report.errors += 1
        log.warning("settle: cannot read call %s (org %s) at Vapi, its hold stays: %s", call_id, org_id, error)
        return
    if record is None:
        report.not_found += 1
        log.info("settle: Vapi does not know call %s (org %s): its hold stays", call_id, org_id)
        return
    if not record.ended:
        report.in_progress += 1
        return
    await _resolve(rt, org_id, record, report)


async def _resolve(rt: Runtime, org_id: str, record: VapiCallRecord, report: SettleReport) -> None:
    """Vapi says the call ended: resolve it as its end-of-call-report would have."""
    seconds = record.billed_seconds
    if seconds is None:
        resolution = await restoring(rt, org_id, lambda: release_call(rt, org_id, record.id))
        if resolution.outcome == Outcome.ok:
            report.released += 1
            report.charged_pence += resolution.charged_pence
        else:
            report.resolved_meanwhile += 1
        return
    meta = record.meta("vapi_get_call")
    resolution = await restoring(rt, org_id, lambda: commit_call(rt, org_id, record.id, seconds, meta=meta))
    if resolution.outcome in (Outcome.ok, Outcome.adjusted):
        report.committed += 1
        report.charged_pence += resolution.charged_pence
        log.info(
            "settle: call %s (org %s) ended at Vapi without a report here: billed %d s, %dp",
            record.id,
            org_id,
            seconds,
            resolution.charged_pence,
        )
    else:
        report.resolved_meanwhile += 1
