"""Call holds: reserve, check (the kill switch), commit, release, expire.

Lifecycle of one call's hold (all decisions in lua/hold_*.lua, one atomic script each):

    reserve ──▶ live ──(check: start the clock, extend block by block, stop the clock)──▶ live
                 │
                 ├── commit  (end-of-call report: actual cost, rest released)     ─▶ committed
                 ├── release (the call ended without a report we can bill from)   ─▶ released
                 └── expire  (never reported; its expiry passed)                  ─▶ expired

Invariants:
- A hold counts against available_pence from the moment it is taken; held_pence is the sum of
  the org's live holds.
- A hold resolves exactly once. The first of commit/release/expire wins; a later commit after a
  release or expiry settles only the difference to the true cost (an adjustment), anything else
  later is a replay.
- A call with no hold and no resolution is billed directly on commit.
- Charges are never dropped: below the overdraft floor they become debt on the ledger.
- Holds and their events reach Postgres through the org's outbox (call_holds), so the reconciler
  can restore live holds after Redis loses them.
"""

import logging
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from credit_engine.engine import limits, validate
from credit_engine.engine.db import bounded
from credit_engine.engine.decisions import decide
from credit_engine.engine.idempotency import call_ledger_key, call_state_key
from credit_engine.engine.killswitch import add_depletion
from credit_engine.engine.records import CallState, HoldRecord
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.results import Money, Outcome, decode
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)


class Unfunded(IntEnum):
    """What hold_reserve.lua does with a call it cannot fund (its ARGV mode)."""

    refuse = 0  # an admission (assistant-request, the reserve API): the call does not start
    record = 1  # a call already running: record an unfunded hold, so it is ended and billed
    always = 2  # a running call that must not be funded (its number is suspended)


@dataclass(frozen=True)
class Reservation:
    outcome: Outcome  # ok, replayed, admitted_unfunded, insufficient_funds, org_unknown, call_already_resolved, ...
    money: Money
    hold_pence: int
    max_duration_s: int  # 0 for an unfunded hold

    @property
    def held(self) -> bool:
        """The call has a hold now (funded or not)."""
        return self.outcome in (Outcome.ok, Outcome.replayed, Outcome.admitted_unfunded)

    @property
    def funded(self) -> bool:
        return self.held and self.max_duration_s > 0


class CallEvent(IntEnum):
    """What a hold_check call also records about the call."""

    check = 0
    start = 1  # the call is in progress: its clock starts
    end = 2  # the call ended: its clock stops


@dataclass(frozen=True)
class CallCheck:
    outcome: Outcome  # ok, org_unknown, hold_not_found
    money: Money
    end_call: bool  # the call has used all the time its hold funds, or has ended
    cost_so_far_pence: int
    hold_pence: int
    remaining_ms: int  # funded time left; <= 0 once the hold is used up
    started: bool
    ended: bool


@dataclass(frozen=True)
class Resolution:
    outcome: Outcome  # ok, replayed, adjusted, org_unknown, idempotency_conflict, hold_not_found, not_expired
    money: Money
    charged_pence: int  # what this resolution moved (an adjustment may be negative: a refund)
    debt_delta_pence: int
    hold_pence: int  # the hold that was resolved (0 for direct billing)


async def reserve_call(rt: Runtime, org_id: str, call_id: str, unfunded: Unfunded = Unfunded.refuse) -> Reservation:
    validate.org_id(org_id)
    validate.call_id(call_id)
    keys = rt.keys.org(org_id)
    result = await decide(
        rt,
        "hold_reserve",
        org_id,
        [keys.org, keys.holds, keys.idem, keys.outbox],
        [
            rt.clock.script_arg(),
            org_id,
            call_id,
            call_state_key(org_id, call_id),
            rt.settings.hold_report_slack_ms,
            rt.settings.outbox_per_org_max,
            int(unfunded),
        ],
        tail_length=2,
        operation="hold",
    )
    hold_pence, max_duration_s = result.tail
    if result.outcome == Outcome.ok or (result.outcome == Outcome.replayed and max_duration_s > 0):
        assert hold_pence > 0
        assert limits.max_duration_s_min <= max_duration_s <= limits.max_duration_s_max
    if result.outcome == Outcome.admitted_unfunded:
        assert unfunded != Unfunded.refuse
        assert (hold_pence, max_duration_s) == (0, 0)
    if result.outcome == Outcome.ok:
        assert result.money.held_pence >= hold_pence
    return Reservation(result.outcome, result.money, hold_pence, max_duration_s)


async def check_call(rt: Runtime, org_id: str, call_id: str, event: CallEvent = CallEvent.check) -> CallCheck:
    """The kill-switch decision; also starts or stops the call's clock (each once)."""
    validate.org_id(org_id)
    validate.call_id(call_id)
    keys = rt.keys.org(org_id)
    reply = await rt.scripts.run(
        rt.redis,
        "hold_check",
        [keys.org, keys.holds, keys.outbox],
        [
            rt.clock.script_arg(),
            org_id,
            call_id,
            int(event),
            rt.settings.hold_report_slack_ms,
            rt.settings.outbox_per_org_max,
            limits.extensions_per_check_max,
        ],
    )
    result = decode(reply, tail_length=7)
    end_call, cost_so_far_pence, hold_pence, remaining_ms, started, recorded, ended = result.tail
    if recorded or result.depletion_ms:
        # Only a start, an end or an extension writes to the outbox (ring the worker for those
        # alone), and only a start or an end moves the depletion moment: one round trip for both.
        # Hints only, after the decision: the sweep and the kill switch's backstop cover a loss.
        try:
            async with rt.redis.pipeline(transaction=False) as pipe:
                if recorded:
                    pipe.sadd(rt.keys.outbox_dirty(org_id), org_id)
                add_depletion(pipe, rt, org_id, result.depletion_ms)
                await pipe.execute()
        except RedisError as error:
            log.warning("could not ring the worker or file org %s's depletion (the sweep will): %s", org_id, error)
    if end_call and not ended:
        assert started
        assert remaining_ms <= 0
    return CallCheck(
        result.outcome,
        result.money,
        bool(end_call),
        cost_so_far_pence,
        hold_pence,
        remaining_ms,
        bool(started),
        bool(ended),
    )


async def commit_call(
    rt: Runtime, org_id: str, call_id: str, billed_seconds: int, *, meta: dict[str, Any] | None = None
) -> Resolution:
    validate.org_id(org_id)
    validate.call_id(call_id)
    validate.whole_number(billed_seconds, "billed_seconds", 0, limits.billed_seconds_max)
    args = [
        call_ledger_key(org_id, call_id, "adjust"),
        billed_seconds,
        rt.settings.idempotency_ttl_ms,
        orjson.dumps(meta or {}).decode(),
    ]
    resolution = await _resolve(rt, "hold_commit", org_id, call_id, [*args, 0])
    if resolution.outcome != Outcome.unknown_call:
        return resolution
    # Redis knows nothing of this call: either it never had a hold (an outbound call, a lost
    # assistant-request: bill it directly) or it was resolved longer ago than Redis keeps
    # idempotency records (CREDIT_ENGINE_IDEMPOTENCY_TTL_S): Postgres, which keeps them forever,
    # decides which. A Redis-only runtime (the Lua tests) has no ledger to ask.
    if rt.pg is not None:
        try:
            async with bounded():  # a Postgres that never answers included
                row = await rt.pg.fetchrow(
                    "SELECT status, charged_pence FROM call_holds WHERE org_id = $1 AND call_id = $2 AND status <> 'live'",
                    org_id,
                    call_id,
                )
        except (asyncpg.PostgresError, OSError, TimeoutError) as error:
            # Postgres away: bill from Redis, as before Redis forgot anything. The only risk is a
            # call resolved more than the idempotency window ago; an unbilled call is the worse one.
            log.warning("cannot ask postgres about call %s of org %s (%s): billing it directly", call_id, org_id, error)
            row = None
        if row is not None:
            log.warning(
                "end-of-call report for call %s of org %s, resolved (%s) before Redis's idempotency window: "
                "not billed again",
                call_id,
                org_id,
                row["status"],
            )
            return Resolution(Outcome.replayed, resolution.money, int(row["charged_pence"] or 0), 0, 0)
    return await _resolve(rt, "hold_commit", org_id, call_id, [*args, 1])


async def release_call(rt: Runtime, org_id: str, call_id: str) -> Resolution:
    return await _release(rt, org_id, call_id, "release")


async def expire_call(rt: Runtime, org_id: str, call_id: str) -> Resolution:
    return await _release(rt, org_id, call_id, "expire")


async def _release(rt: Runtime, org_id: str, call_id: str, mode: str) -> Resolution:
    validate.org_id(org_id)
    validate.call_id(call_id)
    return await _resolve(rt, "hold_release", org_id, call_id, [mode, rt.settings.idempotency_ttl_ms])


async def _resolve(rt: Runtime, script: str, org_id: str, call_id: str, extra_args: list[Any]) -> Resolution:
    """hold_commit and hold_release: the same keys, the same leading arguments."""
    keys = rt.keys.org(org_id)
    result = await decide(
        rt,
        script,
        org_id,
        [keys.org, keys.holds, keys.idem, keys.idem_exp, keys.outbox],
        [
            rt.clock.script_arg(),
            org_id,
            call_id,
            call_state_key(org_id, call_id),
            call_ledger_key(org_id, call_id, "charge"),
            *extra_args,
        ],
        tail_length=3,
        operation=script,
    )
    return _resolution(result)


def _resolution(result: Any) -> Resolution:
    charged_pence, debt_delta_pence, hold_pence = result.tail
    if result.outcome == Outcome.ok:
        assert charged_pence >= 0
        assert 0 <= debt_delta_pence <= charged_pence
    return Resolution(result.outcome, result.money, charged_pence, debt_delta_pence, hold_pence)


async def live_holds(rt: Runtime, org_id: str) -> dict[str, HoldRecord]:
    validate.org_id(org_id)
    raw = await asyncio_reply(rt.redis.hgetall(rt.keys.org(org_id).holds))
    return {call_id: HoldRecord.decode(text) for call_id, text in raw.items()}


async def resolution_remembered(rt: Runtime, org_id: str, call_id: str) -> bool:
    """Whether Redis still has the call's idempotency record, i.e. it resolved the call within its
    idempotency window (CREDIT_ENGINE_IDEMPOTENCY_TTL_S)."""
    remembered: bool = await asyncio_reply(rt.redis.hexists(rt.keys.org(org_id).idem, call_state_key(org_id, call_id)))
    return remembered


async def remembered_resolution(rt: Runtime, org_id: str, call_id: str) -> CallState | None:
    """How Redis resolved the call, from its idempotency record; None when Redis has none (never
    resolved, or longer ago than its idempotency window: ask resolution_in_postgres)."""
    text = await asyncio_reply(rt.redis.hget(rt.keys.org(org_id).idem, call_state_key(org_id, call_id)))
    return None if text is None else CallState.decode(text)


async def resolution_in_postgres(rt: Runtime, org_id: str, call_id: str) -> asyncpg.Record | None:
    """The call's row in Postgres's call_holds (status, charged_pence, billed_seconds), whatever its
    status; None when Postgres has no such call for the org."""
    row: asyncpg.Record | None = await rt.pg.fetchrow(
        "SELECT status, charged_pence, billed_seconds FROM call_holds WHERE org_id = $1 AND call_id = $2",
        org_id,
        call_id,
    )
    return row
