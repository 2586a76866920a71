"""Which org pays for a call: the one rule every Vapi message goes through.

- A call on a number registered here belongs to the number's org: Vapi names the number, and
  the number is the org's. A suspended or released number's calls still belong to its org (a
  call that was running when it was suspended is billed to it), but it admits no new call.
- A call on no registered number (a web call, an outbound call from a number not registered
  here) belongs to an org only if that org admitted it: the org holds the call, or has resolved
  it, in Redis or in Postgres (an assistant-request, the reserve API). The org the platform wrote
  into the call's `assistantOverrides.variableValues.org_id` is a hint that can only confirm
  such an admission, and the call index (the first org to admit the call id) is asked too.
  Neither can make an org pay for a call it did not admit.
- Otherwise the call is unattributed: nobody is billed, and the webhook counts it, logs it and
  ends it unless CREDIT_ENGINE_UNATTRIBUTED_CALLS=allow.
"""

import logging
from dataclasses import dataclass

import asyncpg
from redis.exceptions import RedisError

from credit_engine.engine import keys as key_rules
from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.db import bounded
from credit_engine.engine.idempotency import call_state_key
from credit_engine.engine.phone_numbers import number_owner
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

clock_skew_margin_ms = 10 * 60 * 1000  # between Vapi's clock (call.createdAt) and Redis's


@dataclass(frozen=True)
class Attribution:
    org_id: str | None  # None: unattributed, nobody pays
    by_number: bool  # the call is on a number registered to org_id
    may_admit: bool  # a call not admitted yet may be (its number is active)
    assistant_id: str | None  # the number's assistant

    @property
    def known(self) -> bool:
        return self.org_id is not None


UNATTRIBUTED = Attribution(None, by_number=False, may_admit=False, assistant_id=None)


async def attribute(
    rt: Runtime, index: CallIndex, call_id: str | None, phone_number_id: str | None, org_hint: str | None
) -> Attribution:
    if phone_number_id is not None:
        owner = await number_owner(rt, phone_number_id, active_only=False)
        if owner is not None:
            return Attribution(owner.org_id, by_number=True, may_admit=owner.active, assistant_id=owner.assistant_id)
    if call_id is None or not key_rules.is_call_id(call_id):
        return UNATTRIBUTED
    candidates = [
        org for org in (org_hint, await index.org_of(call_id)) if org is not None and key_rules.is_org_id(org)
    ]
    for org_id in dict.fromkeys(candidates):
        if await admitted_by(rt, org_id, call_id):
            return Attribution(org_id, by_number=False, may_admit=False, assistant_id=None)
    if org_hint is not None:
        log.warning("call %s names org %r, which never admitted it: not billed to it", call_id, org_hint)
    return UNATTRIBUTED


async def admitted_by(rt: Runtime, org_id: str, call_id: str) -> bool:
    """Whether the org holds the call or has resolved it (Redis, else Postgres, which keeps every
    call for good). Unknown when neither answers: no (fail closed, nobody is billed)."""
    keys = rt.keys.org(org_id)
    try:
        async with rt.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(keys.holds, call_id)
            pipe.hexists(keys.idem, call_state_key(org_id, call_id))
            held, resolved = await pipe.execute()
        if held or resolved:
            return True
    except RedisError as error:
        log.warning("cannot ask redis whether org %s admitted call %s: %s", org_id, call_id, error)
    return await _in_call_holds(rt, org_id, call_id, resolved_only=False) is True


async def resolved_in_postgres(rt: Runtime, org_id: str, call_id: str) -> bool | None:
    """Whether Postgres has the call resolved (Redis may have forgotten: its idempotency window).
    None when Postgres cannot say (away, or slower than engine.db.lookup_timeout_s)."""
    return await _in_call_holds(rt, org_id, call_id, resolved_only=True)


async def _in_call_holds(rt: Runtime, org_id: str, call_id: str, *, resolved_only: bool) -> bool | None:
    """Whether Postgres's call_holds has the org's call (resolved, if asked): None if it cannot say."""
    if rt.pg is None:
        return None
    try:
        async with bounded():  # a Postgres that never answers included
            row = await rt.pg.fetchval(
                "SELECT 1 FROM call_holds WHERE org_id = $1 AND call_id = $2 AND (NOT $3 OR status <> 'live')",
                org_id,
                call_id,
                resolved_only,
            )
    except (asyncpg.PostgresError, OSError, TimeoutError) as error:
        log.warning("cannot ask postgres about call %s of org %s: %s", call_id, org_id, error)
        return None
    return row is not None


async def may_be_a_replay(rt: Runtime, org_id: str, call_id: str, created_ms: int | None) -> bool | None:
    """Whether a call first seen live may have been resolved longer ago than Redis remembers.

    A call resolved at R is remembered by Redis until R + CREDIT_ENGINE_IDEMPOTENCY_TTL_S, and R
    comes after the call was created: a call created less than that window ago (Vapi's
    `call.createdAt`, a clock-skew margin aside) cannot have been forgotten, so Redis's own check
    (hold_reserve.lua) is enough and Postgres is not asked. An older call, or one whose age is not
    known, is asked of Postgres; None when Postgres cannot say."""
    if created_ms is not None:
        now_ms = await rt.clock.now_ms(rt.redis)
        if now_ms - created_ms < rt.settings.idempotency_ttl_ms - clock_skew_margin_ms:
            return False
    return await resolved_in_postgres(rt, org_id, call_id)
