"""The kill switch's push side: warn and end live calls through Vapi's control URL when their
org's credit runs out.

Vapi never asks whether a call may go on, so the engine must act. Three layers:
1. `maxDurationSeconds`, answered at assistant-request from what the org's available credit
   funds then: Vapi enforces it even if we are down;
2. this push: the depletion moment of each org with live calls is predicted in Redis (the burn
   sums in lua/_lib.lua, moved by every script that changes them) and the worker, watching the
   schedule, POSTs a spoken warning `kill_warn_lead_ms` before it and `{"type":"end-call"}` at it
   plus the org's grace, to every live call of the org, since they all draw on one balance;
3. the pull endpoint (status-check) for anyone who asks.

The schedule is one sorted set, org -> depletion moment, touched only by plain commands (so it
works unchanged on Redis Cluster; the truth lives in each org's own slot):
- after a script moves an org's depletion moment, its caller files it with `ZADD LT`, so the
  schedule is never later than any moment filed since the worker last looked;
- the worker visits an org `kill_warn_lead_ms` before its score, runs killswitch_tick.lua (the
  decision, atomic in the org's slot), files the org's next visit, then reads the org's burn
  again: if a script moved the depletion moment meanwhile, that moment is filed too (`LT`).
  So a moment filed during a visit is never lost; at worst the org is visited once too early.
A process killed between a script and its ZADD leaves one org unscheduled until the next
event of that org, or until `reschedule_live_orgs` (a worker cron) files every org with live
holds again; maxDurationSeconds bounds the call meanwhile.
"""

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis.exceptions import RedisError

from engine import validate
from engine.runtime import Runtime

log = logging.getLogger(__name__)

control_timeout_s = 3.0
visits_per_round_max = 200
reschedule_page_size = 500  # orgs per Redis pipeline in the backstop


async def file_depletion(rt: Runtime, org_id: str, depletion_ms: int) -> None:
    """File an org's new depletion moment in the schedule (never later than one filed before).

    Called after the decision's script has committed, so a failure here must not fail the
    decision (on a Redis Cluster the schedule's shard is usually on another node, which may be
    the one that is down): it is logged, and the worker's backstop files the org again within
    CREDIT_ENGINE_WORKER_SWEEP_INTERVAL_S."""
    if depletion_ms > 0:
        try:
            await rt.redis.zadd(rt.keys.kill_schedule(org_id), {org_id: depletion_ms}, lt=True)
        except RedisError as error:
            log.warning("could not file org %s in the kill switch's schedule (the backstop will): %s", org_id, error)


def add_depletion(pipe: Any, rt: Runtime, org_id: str, depletion_ms: int) -> None:
    """file_depletion, as one command of a pipeline."""
    if depletion_ms > 0:
        pipe.zadd(rt.keys.kill_schedule(org_id), {org_id: depletion_ms}, lt=True)


def depletion_ms_of(fields: list[Any]) -> int:
    """The depletion moment from the org hash's balance_pence and burn sums, as _lib.lua's
    burn_deadline_ms computes it (0: no call is burning)."""
    balance, burn_rate, burn_k, burn_at_s, frozen = (int(v or 0) for v in fields)
    if burn_rate <= 0:
        return 0
    x = math.ceil((60 * (balance - frozen) - burn_k) / burn_rate)
    return max(1, (burn_at_s + x) * 1000)


BURN_FIELDS = ("balance_pence", "burn_rate", "burn_k", "burn_at_s", "burn_frozen_pence")


@dataclass(frozen=True)
class Action:
    call_id: str
    kind: str  # warn | end | end_failed
    attempt: int


@dataclass(frozen=True)
class Visit:
    org_known: bool
    now_ms: int
    depletion_ms: int  # 0: no call burning
    next_visit_ms: int  # 0: nothing left to watch
    actions: list[Action]


async def visit_org(rt: Runtime, org_id: str) -> Visit:
    validate.org_id(org_id)
    keys = rt.keys.org(org_id)
    s = rt.settings
    reply = await rt.scripts.run(
        rt.redis,
        "killswitch_tick",
        [keys.org, keys.holds, keys.kill, keys.outbox],
        [rt.clock.script_arg(), org_id, s.kill_warn_lead_ms, s.kill_attempts_max, s.kill_backoff_base_ms,
         s.kill_backoff_max_ms, s.kill_recheck_ms],
    )  # fmt: skip
    code, now_ms, depletion_ms, next_visit_ms = (int(v) for v in reply[:4])
    rest = reply[4:]
    actions = [Action(str(rest[i]), str(rest[i + 1]), int(rest[i + 2])) for i in range(0, len(rest), 3)]
    if any(a.kind == "end_failed" for a in actions):
        await rt.redis.sadd(rt.keys.outbox_dirty(org_id), org_id)  # the end_call_failed alert
    return Visit(code == 0, now_ms, depletion_ms, next_visit_ms, actions)


async def acknowledge(rt: Runtime, org_id: str, call_id: str, kind: str) -> None:
    keys = rt.keys.org(org_id)
    await rt.scripts.run_and_ring(
        rt.redis,
        "killswitch_ack",
        [keys.org, keys.kill, keys.outbox],
        [rt.clock.script_arg(), org_id, call_id, kind],
        rt.keys.outbox_dirty(org_id),
        org_id,
    )


async def reschedule(rt: Runtime, org_id: str, visit: Visit) -> None:
    """File the org's next visit, then make sure no depletion moment filed meanwhile is lost."""
    schedule = rt.keys.kill_schedule(org_id)
    # The write, then the read, one after the other: a cluster's pipeline would send the two to
    # their nodes at once, and a read before the write could miss a depletion filed in between.
    if visit.next_visit_ms > 0:
        await rt.redis.zadd(schedule, {org_id: visit.next_visit_ms + rt.settings.kill_warn_lead_ms})
    else:
        await rt.redis.zrem(schedule, org_id)
    burn = await rt.redis.hmget(rt.keys.org(org_id).org, list(BURN_FIELDS))
    now_depletion_ms = depletion_ms_of(burn)
    if now_depletion_ms > 0 and now_depletion_ms != visit.depletion_ms:
        await file_depletion(rt, org_id, now_depletion_ms)


async def due_orgs(rt: Runtime) -> list[str]:
    now_ms = await rt.clock.now_ms(rt.redis)
    horizon = now_ms + rt.settings.kill_warn_lead_ms
    async with rt.redis.pipeline(transaction=False) as pipe:  # every shard, wherever it lives
        for shard in rt.keys.kill_schedule_shards:
            pipe.zrangebyscore(shard, "-inf", horizon, start=0, num=visits_per_round_max, withscores=True)
        replies = await pipe.execute()
    due = sorted((score, org_id) for reply in replies for org_id, score in reply)
    return [org_id for _, org_id in due[:visits_per_round_max]]


async def reschedule_live_orgs(rt: Runtime) -> int:
    """File every org with live holds again (the backstop for a lost ZADD). Returns how many."""
    rows = await rt.pg.fetch("SELECT DISTINCT org_id FROM call_holds WHERE status = 'live'")
    org_ids = [row["org_id"] for row in rows]
    filed = 0
    for start in range(0, len(org_ids), reschedule_page_size):
        page = org_ids[start : start + reschedule_page_size]
        async with rt.redis.pipeline(transaction=False) as pipe:
            for org_id in page:
                pipe.hmget(rt.keys.org(org_id).org, list(BURN_FIELDS))
            burns = await pipe.execute()
        async with rt.redis.pipeline(transaction=False) as pipe:
            for org_id, burn in zip(page, burns, strict=True):
                depletion_ms = depletion_ms_of(burn)
                add_depletion(pipe, rt, org_id, depletion_ms)
                filed += depletion_ms > 0
            await pipe.execute()
    return filed


# Pushing to Vapi ---------------------------------------------------------------------------


def control_url_for(rt: Runtime, stored_url: str | None) -> str | None:
    if not stored_url:
        return None
    base = rt.settings.vapi_control_base_url
    if base is None:
        return stored_url
    parts = urlsplit(stored_url)
    return base + parts.path + (f"?{parts.query}" if parts.query else "")


def control_body(rt: Runtime, kind: str) -> dict[str, Any]:
    if kind == "warn":
        return {"type": "say", "content": rt.settings.kill_warning_text, "endCallAfterSpoken": False}
    return {"type": "end-call"}


async def push(rt: Runtime, http: httpx.AsyncClient, org_id: str, action: Action, control_url: str | None) -> bool:
    """One attempt. True when Vapi took it (2xx)."""
    url = control_url_for(rt, control_url)
    if url is None:
        log.error("kill switch: call %s of org %s has no control URL; cannot %s it (attempt %d)",
                  action.call_id, org_id, action.kind, action.attempt)  # fmt: skip
        return False
    headers = {"Authorization": f"Bearer {rt.settings.vapi_control_token}"} if rt.settings.vapi_control_token else {}
    try:
        response = await http.post(url, json=control_body(rt, action.kind), headers=headers, timeout=control_timeout_s)
    except httpx.HTTPError as error:
        log.warning("kill switch: %s of call %s (org %s) failed, attempt %d: %s", action.kind, action.call_id,
                    org_id, action.attempt, type(error).__name__)  # fmt: skip
        return False
    if not response.is_success:
        log.warning("kill switch: %s of call %s (org %s) got HTTP %d, attempt %d", action.kind, action.call_id,
                    org_id, response.status_code, action.attempt)  # fmt: skip
        return False
    return True


@dataclass
class RoundReport:
    visited: int = 0
    warned: int = 0
    ended: int = 0
    failed_attempts: int = 0
    given_up: int = 0


async def run_round(rt: Runtime, http: httpx.AsyncClient, control_urls: "ControlUrls") -> RoundReport:
    """Visit every org that is due and carry out what the visits decide, concurrently."""
    report = RoundReport()
    org_ids = await due_orgs(rt)

    async def one(org_id: str) -> None:
        visit = await visit_org(rt, org_id)
        report.visited += 1
        pushes = []
        for action in visit.actions:
            if action.kind == "end_failed":
                report.given_up += 1
                log.error("kill switch: gave up ending call %s of org %s after %d attempts; flagged for review "
                          "(alert end_call_failed)", action.call_id, org_id, action.attempt)  # fmt: skip
            else:
                pushes.append(action)
        urls = await control_urls.get(org_id, [a.call_id for a in pushes])
        results = await asyncio.gather(*(push(rt, http, org_id, a, urls.get(a.call_id)) for a in pushes))
        for action, ok in zip(pushes, results, strict=True):
            if ok:
                await acknowledge(rt, org_id, action.call_id, action.kind)
                if action.kind == "warn":
                    report.warned += 1
                else:
                    report.ended += 1
                    log.warning("kill switch: ended call %s of org %s: credit ran out", action.call_id, org_id)
            else:
                report.failed_attempts += 1
        if visit.org_known:
            await reschedule(rt, org_id, visit)
        else:
            await rt.redis.zrem(rt.keys.kill_schedule(org_id), org_id)

    await asyncio.gather(*(one(org_id) for org_id in org_ids))
    return report


class ControlUrls:
    """Where each call's control URL is kept: the call index (webapp/call_index.py) that the
    webhook fills from `call.monitor.controlUrl`."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def get(self, org_id: str, call_ids: list[str]) -> dict[str, str | None]:
        if not call_ids:
            return {}
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            for call_id in call_ids:
                pipe.hmget(self.rt.keys.call_index(call_id), ["org_id", "control_url"])
            replies = await pipe.execute()
        urls: dict[str, str | None] = {}
        for call_id, (owner, url) in zip(call_ids, replies, strict=True):
            # Only the org that owns the call may have it ended (first claim wins in the index).
            urls[call_id] = url if owner == org_id else None
        return urls
