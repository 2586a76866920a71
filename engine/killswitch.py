"""The kill switch's push side: warn and end live calls through Vapi's control URL when their
org's credit runs out.

Vapi never asks whether a call may go on, so the engine must act. Three layers:
1. `maxDurationSeconds`, answered at assistant-request from what the org's available credit
   funds then: Vapi enforces it even if we are down;
2. this push: the depletion moment of each org with live calls is predicted in Redis (the burn
   sums in lua/_burn.lua, moved by every script that changes them; engine/burn.py is their Python
   model) and the worker, watching the
   schedule, POSTs a spoken warning `kill_warn_lead_ms` before it and `{"type":"end-call"}` at it
   plus the org's grace, to every live call of the org, since they all draw on one balance;
3. the pull endpoint (status-check) for anyone who asks.

The schedule is a sorted set org -> depletion moment split into shards (`Keyspace.kill_schedule`:
an org's shard by `hint_shard`, the shards spread over a cluster's masters, the worker visits every
shard), touched only by plain commands (so it works unchanged on Redis Cluster; the truth lives in
each org's own slot):
- after a script moves an org's depletion moment, its caller files it with `ZADD LT`, so the
  schedule is never later than any moment filed since the worker last looked;
- the worker visits an org `kill_warn_lead_ms` before its score, runs killswitch_tick.lua (the
  decision, atomic in the org's slot), files the org's next visit, then reads the org's burn
  again: if a script moved the depletion moment meanwhile, that moment is filed too (`LT`).
  So a moment filed during a visit is never lost; at worst the org is visited once too early.
A process killed between a script and its ZADD leaves one org unscheduled until the next
event of that org, or until `reschedule_live_orgs` (a worker cron) files every org with live
holds again; maxDurationSeconds bounds the call meanwhile.

The pushes (KillSwitch, one per worker): a round visits the due orgs, at most
visits_per_round_max of them (the next round starts at once while more are due, else when the
earliest org is due, at most the poll interval later), and hands each
action the tick decides to a push task of its own, so a slow or silent control URL holds up
neither the round nor anyone else's end-call. A push is one POST (engine/killswitch_push.py, through
engine/control.py: Vapi's hosts only, the token, the base URL) with a deadline counted from the hand-out; a 2xx is acknowledged
(killswitch_ack.lua), anything else is a failed attempt that the tick hands out again after its
backoff. So each action is in flight at most once per worker (this worker skips an action it is
still pushing; the deadline stays below the backoff, so across workers the tick's backoff keeps
it so) and is delivered at least once. The same rounds serve the end queue (engine/end_queue.py):
live calls no hold covers.
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from redis.exceptions import RedisError

from credit_engine.engine import burn, validate
from credit_engine.engine.config import ConfigError, Settings
from credit_engine.engine.control import ControlClients
from credit_engine.engine.end_queue import (
    claim_unheld_call,
    defer_unheld_call,
    due_unheld_calls,
    end_queue_per_round_max,
    forget_unheld_call,
    give_up_unheld_call,
    release_unheld_call,
)
from credit_engine.engine.killswitch_push import Action, ControlUrls, push
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

visits_per_round_max = 200
visits_in_flight_max = 32  # ticks (and their follow-ups) one round has under way at once
round_pause_s_min = 0.01  # between rounds that were not full: a claim another worker holds is not spun on
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


@dataclass(frozen=True)
class Visit:
    org_known: bool
    now_ms: int
    depletion_ms: int  # 0: no call burning
    next_visit_ms: int  # 0: nothing left to watch
    actions: list[Action]
    unfunded_n: int = 0  # the org's unfunded holds ever taken, as the visit saw them


async def visit_org(rt: Runtime, org_id: str) -> Visit:
    validate.org_id(org_id)
    keys = rt.keys.org(org_id)
    s = rt.settings
    reply = await rt.scripts.run(
        rt.redis,
        "killswitch_tick",
        [keys.org, keys.holds, keys.kill, keys.outbox, keys.control],
        [
            rt.clock.script_arg(),
            org_id,
            s.kill_warn_lead_ms,
            s.kill_attempts_max,
            s.kill_backoff_base_ms,
            s.kill_backoff_max_ms,
            s.kill_recheck_ms,
        ],
    )
    code, now_ms, depletion_ms, next_visit_ms, unfunded_n = (int(v) for v in reply[:5])
    rest = reply[5:]
    actions = [Action(str(rest[i]), str(rest[i + 1]), int(rest[i + 2])) for i in range(0, len(rest), 3)]
    if any(a.kind == "end_failed" for a in actions):
        await asyncio_reply(rt.redis.sadd(rt.keys.outbox_dirty(org_id), org_id))  # the end_call_failed alert
    return Visit(code == 0, now_ms, depletion_ms, next_visit_ms, actions, unfunded_n)


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
    fields = await asyncio_reply(rt.redis.hmget(rt.keys.org(org_id).org, [*burn.FIELDS, "unfunded_n"]))
    if int(fields[-1] or 0) != visit.unfunded_n:
        # An unfunded hold was taken during the visit: its "now" may have been overwritten above.
        await file_depletion(rt, org_id, visit.now_ms)
        return
    now_depletion_ms = burn.depletion_ms_of(fields[:-1])
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


async def next_due_ms(rt: Runtime) -> int | None:
    """The earliest moment an org of the schedule or a call of the end queue is due (Redis ms),
    None when neither holds anything."""
    async with rt.redis.pipeline(transaction=False) as pipe:  # every shard, wherever it lives
        for shard in rt.keys.kill_schedule_shards + rt.keys.end_queue_shards:
            pipe.zrange(shard, 0, 0, withscores=True)
        replies = await pipe.execute()
    count = len(rt.keys.kill_schedule_shards)
    visits = [int(reply[0][1]) - rt.settings.kill_warn_lead_ms for reply in replies[:count] if reply]
    unheld = [int(reply[0][1]) for reply in replies[count:] if reply]
    return min(visits + unheld, default=None)


async def reschedule_live_orgs(rt: Runtime) -> int:
    """File every org with live holds again (the backstop for a lost ZADD). Returns how many."""
    rows = await rt.pg.fetch(
        "SELECT org_id, bool_or(max_duration_seconds = 0 AND ended_at IS NULL) AS unfunded "
        "FROM call_holds WHERE status = 'live' GROUP BY org_id"
    )
    org_ids = [row["org_id"] for row in rows]
    # An org with a live unfunded hold (hold_reserve.lua) is due now: that call is to be ended at once.
    unfunded = {row["org_id"] for row in rows if row["unfunded"]}
    now_ms = await rt.clock.now_ms(rt.redis) if unfunded else 0
    filed = 0
    for start in range(0, len(org_ids), reschedule_page_size):
        page = org_ids[start : start + reschedule_page_size]
        async with rt.redis.pipeline(transaction=False) as pipe:
            for org_id in page:
                pipe.hmget(rt.keys.org(org_id).org, list(burn.FIELDS))
            burns = await pipe.execute()
        async with rt.redis.pipeline(transaction=False) as pipe:
            for org_id, fields in zip(page, burns, strict=True):
                depletion_ms = now_ms if org_id in unfunded else burn.depletion_ms_of(fields)
                add_depletion(pipe, rt, org_id, depletion_ms)
                filed += depletion_ms > 0
            await pipe.execute()
    return filed


# Pushing to Vapi ---------------------------------------------------------------------------


def check_settings(settings: Settings) -> None:
    """The relations the pushes rely on; a worker refuses to start without them."""
    if settings.kill_push_deadline_ms >= settings.kill_backoff_base_ms:
        raise ConfigError(
            "CREDIT_ENGINE_KILL_PUSH_DEADLINE_MS must be below CREDIT_ENGINE_KILL_BACKOFF_BASE_MS: a "
            "push must be over before the tick hands its action out again"
        )
    if settings.kill_end_queue_ttl_ms <= settings.kill_attempts_max * settings.kill_backoff_max_ms:
        raise ConfigError(
            "CREDIT_ENGINE_KILL_END_QUEUE_TTL_S must exceed CREDIT_ENGINE_KILL_ATTEMPTS_MAX x "
            "CREDIT_ENGINE_KILL_BACKOFF_MAX_MS: an end-queue entry must outlive its retries"
        )


@dataclass
class RoundReport:
    visited: int = 0
    warned: int = 0
    ended: int = 0
    failed_attempts: int = 0
    given_up: int = 0
    ended_unheld: int = 0  # calls of the end queue (no hold) that Vapi took an end-call for
    skipped_in_flight: int = 0  # actions handed out again while this worker's push was still under way

    def counters(self) -> dict[str, int]:
        """As the worker counts them (credit_engine_worker_events{event=...})."""
        return {
            "kill_warned": self.warned,
            "kill_ended": self.ended,
            "kill_failed_attempts": self.failed_attempts,
            "kill_given_up": self.given_up,
            "kill_ended_unheld": self.ended_unheld,
            "kill_skipped_in_flight": self.skipped_in_flight,
        }


@dataclass(frozen=True)
class Push:
    org_id: str | None  # None: an end-queue call whose org is not known
    action: Action
    control_url: str | None
    handed_out_at: float  # event-loop time: the push's deadline counts from here
    unheld: bool = False  # from the end queue: acknowledged there, not by killswitch_ack.lua

    @property
    def key(self) -> tuple[bool, str, str, str]:
        """One push in flight per key. An end-queue call is known by its call id alone (its org is
        read when it is claimed)."""
        if self.unheld:
            return (True, "", self.action.call_id, "end")
        return (False, self.org_id or "", self.action.call_id, self.action.kind)


class KillSwitch:
    """One worker's kill switch. `round()` visits what is due and hands every action to a push
    task of its own, then returns: a slow or silent control URL delays nobody else, and the next
    round starts on time. End-calls start as soon as their org's tick has decided them; warnings
    (a courtesy) once the round's visits are done. Bounds: at most `visits_in_flight_max` ticks at
    once; no visit while `kill_pushes_in_flight_max` pushes are under way or about to be (the org
    stays due for a later round), so the pushes exceed it by at most the calls of the visits
    already under way; each push ends by `kill_push_deadline_ms` after its action was handed out
    (the wait for a slot included). An action whose push is still under way here is not pushed
    twice; across workers the tick's backoff is the guard (a handed-out action is not due again for
    kill_backoff_base_ms, which the deadline stays below). `drain()` waits for the pushes in flight
    (tests, shutdown)."""

    def __init__(self, rt: Runtime, http: httpx.AsyncClient | ControlClients, control_urls: ControlUrls) -> None:
        check_settings(rt.settings)
        self.rt, self.control_urls = rt, control_urls
        self.clients = http if isinstance(http, ControlClients) else ControlClients.of(http)
        self.slots = asyncio.Semaphore(rt.settings.kill_pushes_in_flight_max)
        self.visit_slots = asyncio.Semaphore(visits_in_flight_max)
        self.pushes: dict[tuple[bool, str, str, str], asyncio.Task[None]] = {}
        self.warnings_waiting = 0  # handed out this round, started when its visits are done
        self.report = RoundReport()

    @property
    def full(self) -> bool:
        return len(self.pushes) + self.warnings_waiting >= self.rt.settings.kill_pushes_in_flight_max

    def take_report(self) -> RoundReport:
        """What was done since the last take (pushes finish between rounds)."""
        report, self.report = self.report, RoundReport()
        return report

    async def round(self) -> float:
        """One round. Returns how long to wait before the next, in seconds: 0 when it was full (more
        is due now), else until the earliest org or end-queue call is next due, but at most the
        poll interval (a web process may file an earlier depletion moment at any time)."""
        poll_s = self.rt.settings.kill_poll_interval_ms / 1000
        org_ids = [] if self.full else await due_orgs(self.rt)
        *visited, unheld_due = await asyncio.gather(
            *(self._visit(org_id) for org_id in org_ids), self._end_queue_round(), return_exceptions=True
        )
        self.warnings_waiting = 0
        for outcome in visited:
            if isinstance(outcome, list):  # else an exception, raised below
                for warning in outcome:
                    self._start(warning)
        for outcome in [*visited, unheld_due]:
            if isinstance(outcome, BaseException):
                raise outcome  # once everything else of the round is done; the loop logs it
        assert isinstance(unheld_due, int)
        if self.full:
            return poll_s
        if len(org_ids) >= visits_per_round_max or unheld_due >= end_queue_per_round_max:
            return 0.0
        next_ms = await next_due_ms(self.rt)
        if next_ms is None:
            return poll_s
        now_ms = await self.rt.clock.now_ms(self.rt.redis)
        return min(poll_s, max(round_pause_s_min, (next_ms - now_ms) / 1000))

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for the pushes in flight (none starts meanwhile); past timeout_s they are cancelled."""
        tasks = list(self.pushes.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _visit(self, org_id: str) -> list[Push]:
        """One org's tick: its end-calls start at once, its warnings are returned (to start once
        the round's visits are done); then the org's next visit is filed."""
        async with self.visit_slots:
            if self.full:
                return []  # left due: a later round visits it once pushes are free
            visit = await visit_org(self.rt, org_id)
            handed_out_at = asyncio.get_running_loop().time()
            self.report.visited += 1
            actions = [a for a in visit.actions if self._to_push(org_id, a)]
            urls = await self.control_urls.get(org_id, [a.call_id for a in actions])
            pushes = [Push(org_id, a, urls.get(a.call_id), handed_out_at) for a in actions]
            warnings = [p for p in pushes if p.action.kind == "warn"]
            self.warnings_waiting += len(warnings)
            for p in pushes:
                if p.action.kind == "end":
                    self._start(p)
        try:
            if visit.org_known:
                await reschedule(self.rt, org_id, visit)
            else:
                await self.rt.redis.zrem(self.rt.keys.kill_schedule(org_id), org_id)
        except RedisError:  # its warnings still go; the org stays due (visited again) or the backstop files it
            log.exception("kill switch: could not file org %s's next visit", org_id)
        return warnings

    def _to_push(self, org_id: str, action: Action) -> bool:
        if action.kind == "end_failed":
            self.report.given_up += 1
            log.error(
                "kill switch: gave up ending call %s of org %s after %d attempts; flagged for review "
                "(alert end_call_failed)",
                action.call_id,
                org_id,
                action.attempt,
            )
            return False
        if (False, org_id, action.call_id, action.kind) in self.pushes:
            self.report.skipped_in_flight += 1
            log.info(
                "kill switch: %s of call %s (org %s) is still under way; attempt %d skipped",
                action.kind,
                action.call_id,
                org_id,
                action.attempt,
            )
            return False
        return True

    async def _end_queue_round(self) -> int:
        """Claim the due calls of the end queue (no org holds them), push their end-calls, and give
        up those whose attempts are used up. Returns how many were due."""
        if self.full:
            return 0
        now_ms = await self.rt.clock.now_ms(self.rt.redis)
        call_ids = await due_unheld_calls(self.rt, now_ms, end_queue_per_round_max)
        free = [c for c in call_ids if (True, "", c, "end") not in self.pushes]
        claims = [c for c in await asyncio.gather(*(claim_unheld_call(self.rt, c, now_ms) for c in free)) if c]
        handed_out_at = asyncio.get_running_loop().time()
        for claim in claims:
            if not claim.give_up:
                self._start(
                    Push(
                        claim.org_id,
                        Action(claim.call_id, "end", claim.attempts),
                        claim.control_url,
                        handed_out_at,
                        unheld=True,
                    )
                )
        for claim in claims:
            if claim.give_up:
                try:
                    await give_up_unheld_call(self.rt, claim, now_ms)
                    self.report.given_up += 1
                except Exception:  # Postgres away: the entry stays; a round after the backoff gives up again
                    log.exception("kill switch: could not give up call %s of the end queue yet", claim.call_id)
                    await defer_unheld_call(self.rt, claim.call_id, now_ms + self.rt.settings.kill_backoff_max_ms)
        return len(call_ids)

    def _start(self, p: Push) -> None:
        key = p.key
        assert key not in self.pushes
        deadline = p.handed_out_at + self.rt.settings.kill_push_deadline_ms / 1000
        self.pushes[key] = asyncio.create_task(
            self._push(p, deadline, key), name=f"kill-{p.action.kind}-{p.action.call_id}"
        )

    async def _push(self, p: Push, deadline: float, key: tuple[bool, str, str, str]) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout_at(deadline), self.slots, self.clients.client() as http:
                    taken = await push(
                        self.rt, http, p.org_id, p.action, p.control_url, timeout_s=max(0.001, deadline - loop.time())
                    )
            except TimeoutError:
                taken = False
                log.warning(
                    "kill switch: %s of call %s (org %s), attempt %d: no answer within %d ms",
                    p.action.kind,
                    p.action.call_id,
                    p.org_id,
                    p.action.attempt,
                    self.rt.settings.kill_push_deadline_ms,
                )
            await self._settle(p, taken)
        except Exception:
            log.exception(
                "kill switch: the %s push to call %s (org %s) failed", p.action.kind, p.action.call_id, p.org_id
            )
        finally:
            self.pushes.pop(key, None)

    async def _settle(self, p: Push, taken: bool) -> None:
        """Record one push's result: acknowledged (the tick stops handing it out) or a failed attempt."""
        if not taken:
            self.report.failed_attempts += 1
            if p.unheld:
                await release_unheld_call(self.rt, p.action.call_id)
            return
        if p.unheld:
            await forget_unheld_call(self.rt, p.action.call_id)
            self.report.ended_unheld += 1
            log.warning("kill switch: ended call %s (org %s), which no hold covered", p.action.call_id, p.org_id)
            return
        assert p.org_id is not None
        await acknowledge(self.rt, p.org_id, p.action.call_id, p.action.kind)
        if p.action.kind == "warn":
            self.report.warned += 1
        else:
            self.report.ended += 1
            log.warning("kill switch: ended call %s of org %s: credit ran out", p.action.call_id, p.org_id)


async def run_round(rt: Runtime, http: httpx.AsyncClient, control_urls: ControlUrls) -> RoundReport:
    """One round by a kill switch of its own, waiting for its pushes: what tests and one-off
    callers want. The worker keeps one KillSwitch and does not wait."""
    kill_switch = KillSwitch(rt, http, control_urls)
    await kill_switch.round()
    await kill_switch.drain()
    return kill_switch.take_report()
