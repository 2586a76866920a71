"""The end queue: live calls that must be ended although no org's hold covers them.

A call no org admitted (unattributed), or one already resolved that shows up live again, has no
hold, so killswitch_tick.lua never hands it out. `end_unheld_call` files it here, and the
worker's kill switch (engine/killswitch.py) POSTs `{"type":"end-call"}` to its control URL with
the same host check, token and base URL as every push (engine/control.py), retried with the kill
switch's backoff up to kill_attempts_max attempts, then given up: an ERROR line, the worker
counter `kill_given_up` and, when the org is known, an `end_call_failed` alert.

In Redis, under our prefix, with plain commands only (so it runs unchanged on a Redis Cluster):
every key of one call carries its shard's hash tag, sharded by call id like the kill schedule.
- entry  <prefix>:killswitch:end:{<tag>}:call:<call_id>  JSON, expires after kill_end_queue_ttl_ms
- due    <prefix>:killswitch:end:{<tag>}                 sorted set call_id -> next attempt (ms)
- lock   <prefix>:killswitch:end:{<tag>}:lock:<call_id>  while one worker's POST is under way
Enqueueing is `SET entry NX PX` then `ZADD due NX`: a second enqueue while the first is pending
changes nothing and does not reset its attempts. A worker claims a due call with `SET lock NX
PX` (one POST in flight across workers), then counts the attempt in the entry and moves its due
time on by the backoff before it sends, so a worker that dies mid-way leaves the call due again
(at least once). A 2xx deletes the entry, and so does giving up; a new enqueue after that starts
afresh. The TTL bounds an entry nobody processes, `end_queue_per_shard_max` the sorted sets.
"""

import logging
from dataclasses import dataclass

import asyncpg
import orjson

from credit_engine.engine.control import control_url_allowed
from credit_engine.engine.idempotency import end_call_failed_alert_key
from credit_engine.engine.keys import is_call_id, is_org_id
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

end_queue_per_round_max = 100  # calls claimed per kill-switch round, over every shard
end_queue_per_shard_max = 10_000  # queued calls per shard: an enqueue past this is refused
end_queue_lock_margin_ms = 1_000  # a claim outlives its POST's deadline by this much
reason_length_max = 64
REFUSED_COUNTER = "kill_end_unheld_refused"


@dataclass(frozen=True)
class UnheldCall:
    call_id: str
    org_id: str | None
    control_url: str
    reason: str
    attempts: int  # counting the one this claim is for
    give_up: bool  # attempts used up: give it up rather than send


def backoff_ms(rt: Runtime, attempts: int) -> int:
    """The wait after the attempts-th attempt, as killswitch_tick.lua's backoff()."""
    assert attempts >= 1
    s = rt.settings
    return int(min(s.kill_backoff_base_ms * 2 ** (attempts - 1), s.kill_backoff_max_ms))


async def end_unheld_call(
    rt: Runtime, call_id: str, control_url: str | None, *, org_id: str | None, reason: str
) -> bool:
    """File a live call no org holds for an end-call. False (an ERROR line and the counter
    kill_end_unheld_refused) when it cannot be: no usable control URL, a bad call id, a full shard."""
    assert isinstance(reason, str) and reason, "say why the call must end"
    reason = reason[:reason_length_max]
    if org_id is not None and not is_org_id(org_id):
        log.warning("end queue: call %r names an org id the engine does not accept; treated as unknown", call_id)
        org_id = None
    problem = await _enqueue_problem(rt, call_id, control_url)
    if problem is not None:
        log.error(
            "end queue: cannot end call %r (org %s, %s): %s; it runs until Vapi's maxDurationSeconds",
            call_id,
            org_id,
            reason,
            problem,
        )
        await asyncio_reply(rt.redis.hincrby(rt.keys.worker_counters, REFUSED_COUNTER, 1))
        return False
    assert control_url is not None
    now_ms = await rt.clock.now_ms(rt.redis)
    entry = {"org_id": org_id, "control_url": control_url, "reason": reason, "attempts": 0, "enqueued_ms": now_ms}
    async with rt.redis.pipeline(transaction=False) as pipe:  # one slot: one node, in this order
        pipe.set(rt.keys.end_queue_entry(call_id), orjson.dumps(entry), nx=True, px=rt.settings.kill_end_queue_ttl_ms)
        pipe.zadd(rt.keys.end_queue(call_id), {call_id: now_ms}, nx=True)  # also refiles one whose ZADD a crash lost
        created, _ = await pipe.execute()
    if created:
        log.warning("end queue: call %s (org %s) is live with no hold (%s); ending it", call_id, org_id, reason)
    return True


async def _enqueue_problem(rt: Runtime, call_id: str, control_url: str | None) -> str | None:
    """Why the call cannot be queued, or None."""
    if not is_call_id(call_id):
        return "a call id the engine does not accept"
    if not control_url:
        return "no control URL"
    if not control_url_allowed(rt.settings, control_url):
        return f"a control URL not on {', '.join(rt.settings.control_url_hosts)} over https"
    if await rt.redis.zcard(rt.keys.end_queue(call_id)) >= end_queue_per_shard_max:
        return f"its shard of the end queue is full ({end_queue_per_shard_max} calls)"
    return None


async def due_unheld_calls(rt: Runtime, now_ms: int, limit: int) -> list[str]:
    """The calls whose next attempt is due, earliest first, at most `limit`."""
    assert 0 < limit <= end_queue_per_round_max
    async with rt.redis.pipeline(transaction=False) as pipe:  # every shard, wherever it lives
        for shard in rt.keys.end_queue_shards:
            pipe.zrangebyscore(shard, "-inf", now_ms, start=0, num=limit, withscores=True)
        replies = await pipe.execute()
    due = sorted((score, call_id) for reply in replies for call_id, score in reply)
    return [call_id for _, call_id in due[:limit]]


async def claim_unheld_call(rt: Runtime, call_id: str, now_ms: int) -> UnheldCall | None:
    """Take a due call for one attempt (None: another worker has it, or it is gone). The attempt is
    counted and the next one scheduled before anything is sent."""
    lock = rt.keys.end_queue_lock(call_id)
    lease_ms = rt.settings.kill_push_deadline_ms + end_queue_lock_margin_ms
    if not await rt.redis.set(lock, "1", nx=True, px=lease_ms):
        return None
    due_ms = await rt.redis.zscore(rt.keys.end_queue(call_id), call_id)
    if due_ms is not None and due_ms > now_ms:
        # Listed before another worker's attempt moved it on: not due any more (its backoff).
        await rt.redis.delete(lock)
        return None
    raw = await rt.redis.get(rt.keys.end_queue_entry(call_id))
    if raw is None:  # ended, given up or expired meanwhile
        async with rt.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(rt.keys.end_queue(call_id), call_id)
            pipe.delete(lock)
            await pipe.execute()
        return None
    try:
        entry = orjson.loads(raw)
        attempts = int(entry["attempts"])
        valid = isinstance(entry["control_url"], str) and isinstance(entry["reason"], str)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        log.error("end queue: the entry of call %s is not one of ours; dropped: %r", call_id, raw[:200])
        await forget_unheld_call(rt, call_id)
        return None
    if attempts >= rt.settings.kill_attempts_max:
        return UnheldCall(call_id, entry["org_id"], entry["control_url"], entry["reason"], attempts, give_up=True)
    entry["attempts"] = attempts + 1
    async with rt.redis.pipeline(transaction=False) as pipe:
        pipe.set(rt.keys.end_queue_entry(call_id), orjson.dumps(entry), xx=True, keepttl=True)
        pipe.zadd(rt.keys.end_queue(call_id), {call_id: now_ms + backoff_ms(rt, attempts + 1)}, xx=True)
        await pipe.execute()
    return UnheldCall(call_id, entry["org_id"], entry["control_url"], entry["reason"], attempts + 1, give_up=False)


async def forget_unheld_call(rt: Runtime, call_id: str) -> None:
    """Ended (Vapi took the end-call) or given up: the entry, its due time and the claim go."""
    async with rt.redis.pipeline(transaction=False) as pipe:
        pipe.delete(rt.keys.end_queue_entry(call_id))
        pipe.zrem(rt.keys.end_queue(call_id), call_id)
        pipe.delete(rt.keys.end_queue_lock(call_id))
        await pipe.execute()


async def release_unheld_call(rt: Runtime, call_id: str) -> None:
    """An attempt failed: let the next one (due after its backoff) be claimed by any worker."""
    await rt.redis.delete(rt.keys.end_queue_lock(call_id))


async def defer_unheld_call(rt: Runtime, call_id: str, due_ms: int) -> None:
    """Try again at due_ms (a give-up Postgres could not record yet: not every round meanwhile)."""
    async with rt.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(rt.keys.end_queue(call_id), {call_id: due_ms}, xx=True)
        pipe.delete(rt.keys.end_queue_lock(call_id))
        await pipe.execute()


async def give_up_unheld_call(rt: Runtime, call: UnheldCall, now_ms: int) -> None:
    """The alert first (if Postgres is away this raises, and the next round gives up again), then
    the entry goes."""
    assert call.give_up
    log.error(
        "kill switch: gave up ending call %s (org %s, no hold: %s) after %d attempts; flagged for review "
        "(alert end_call_failed)",
        call.call_id,
        call.org_id,
        call.reason,
        call.attempts,
    )
    if call.org_id is not None:
        await alert_end_call_failed(rt, call, now_ms)
    await forget_unheld_call(rt, call.call_id)


async def alert_end_call_failed(rt: Runtime, call: UnheldCall, now_ms: int) -> None:
    assert call.org_id is not None
    key = end_call_failed_alert_key(call.org_id, call.call_id)
    payload = {
        "id": key,
        "type": "end_call_failed",
        "org_id": call.org_id,
        "call_id": call.call_id,
        "reason": call.reason,
        "attempts": call.attempts,
        "at_ms": now_ms,
    }
    try:
        await rt.pg.execute(
            """INSERT INTO alert_events (org_id, idempotency_key, kind, call_id, payload, created_at)
               VALUES ($1, $2, 'end_call_failed', $3, $4::text::jsonb, to_timestamp($5::bigint / 1000.0))
               ON CONFLICT (idempotency_key) DO NOTHING""",
            call.org_id,
            key,
            call.call_id,
            orjson.dumps(payload).decode(),
            now_ms,
        )
    except asyncpg.ForeignKeyViolationError:
        log.error("end queue: org %s of call %s is not in Postgres; no alert", call.org_id, call.call_id)
