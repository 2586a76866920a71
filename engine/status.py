"""`credit-engine status`: what an operator needs at a glance, for the deployment or one org.

Everything is read from Redis (the live view) in a few round trips: no Postgres query, so it can
refresh every second like `top` (`--watch`) without loading the ledger. Times are Redis TIME.
"""

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from credit_engine.engine.amounts import format_pence
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.burn import FIELDS as BURN_FIELDS
from credit_engine.engine.burn import depletion_ms_of
from credit_engine.engine.clock import redis_now_ms
from credit_engine.engine.holds import live_holds
from credit_engine.engine.ledger_lag import outbox_lag_ms
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.worker_health import arq_health_check_present, worker_stats

worker_stale_ms = 10_000
busiest_shown = 10


@dataclass
class LiveCall:
    call_id: str
    started: str | None
    seconds_running: int
    rate_pence_per_minute: int
    hold_pence: int
    expires_in_s: int


@dataclass
class OrgStatus:
    org_id: str
    balance_pence: int
    held_pence: int
    available_pence: int
    debt_pence: int
    outbox_entries: int
    credit_runs_out_in_s: int | None  # at the live calls' burn rate; None: nothing is burning
    calls: list[LiveCall] = field(default_factory=list)


@dataclass
class DeploymentStatus:
    redis_time: str
    worker: str
    worker_ok: bool
    outbox_entries: int
    outbox_lag_ms: int | None
    ledger_entries_written: int
    orgs_with_live_calls: int
    live_calls: int
    busiest: list[OrgStatus] = field(default_factory=list)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


async def org_status(rt: Runtime, org_id: str, now_ms: int | None = None) -> OrgStatus | None:
    now_ms = now_ms if now_ms is not None else await redis_now_ms(rt.redis)
    wallet = await read_wallet(rt, org_id)
    if wallet is None:
        return None
    keys = rt.keys.org(org_id)
    burn = await asyncio_reply(rt.redis.hmget(keys.org, list(BURN_FIELDS)))
    depletion_ms = depletion_ms_of(burn)
    holds = await live_holds(rt, org_id)
    calls = [
        LiveCall(
            call_id,
            _iso(hold.started_ms) if hold.started_ms else None,
            max(0, (now_ms - hold.started_ms) // 1000) if hold.started_ms else 0,
            hold.rate_pence_per_minute,
            hold.hold_pence,
            max(0, math.ceil((hold.expires_ms - now_ms) / 1000)),
        )
        for call_id, hold in sorted(holds.items())
    ]
    return OrgStatus(
        org_id,
        wallet.balance_pence,
        wallet.held_pence,
        wallet.available_pence,
        wallet.debt_pence,
        await rt.redis.xlen(keys.outbox),
        max(0, math.ceil((depletion_ms - now_ms) / 1000)) if depletion_ms else None,
        calls,
    )


async def deployment_status(rt: Runtime) -> DeploymentStatus:
    now_ms = await redis_now_ms(rt.redis)
    stats = await worker_stats(rt.redis, rt.keys)
    arq_alive = bool(await arq_health_check_present(rt.settings, rt.redis))
    if "heartbeat_ms" in stats:
        silence_ms = now_ms - stats["heartbeat_ms"]
        worker_ok = silence_ms <= worker_stale_ms and arq_alive
        worker = f"{'alive' if worker_ok else 'SILENT'}: last heartbeat {silence_ms / 1000:.1f} s ago"
    else:
        worker_ok, worker = False, "NONE: no worker has ever reported"
    # The kill switch's schedule holds every org with a call burning credit: the busiest first.
    async with rt.redis.pipeline(transaction=False) as pipe:  # every shard in one round trip
        for shard in rt.keys.kill_schedule_shards:
            pipe.zrange(shard, 0, -1)
        burning = [org_id for shard_members in await pipe.execute() for org_id in shard_members]
    statuses = [s for s in [await org_status(rt, org_id, now_ms) for org_id in burning] if s is not None and s.calls]
    statuses.sort(key=lambda s: (-len(s.calls), s.credit_runs_out_in_s or 0))
    return DeploymentStatus(
        _iso(now_ms),
        worker,
        worker_ok,
        stats.get("outbox_entries", 0),
        outbox_lag_ms(stats, now_ms) if stats else None,
        stats.get("entries_written", 0),
        len(statuses),
        sum(len(s.calls) for s in statuses),
        statuses[:busiest_shown],
    )


def as_json(status: DeploymentStatus | OrgStatus) -> dict[str, Any]:
    return asdict(status)


def _runs_out(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def render_org(status: OrgStatus) -> str:
    lines = [
        f"org {status.org_id}",
        f"  balance {format_pence(status.balance_pence)}  held {format_pence(status.held_pence)}  "
        f"available {format_pence(status.available_pence)}  debt {format_pence(status.debt_pence)}",
        f"  live calls {len(status.calls)}  credit runs out in {_runs_out(status.credit_runs_out_in_s)}  "
        f"outbox {status.outbox_entries} entries",
    ]
    if status.calls:
        lines.append(f"  {'call':<36} {'running':>8} {'rate/min':>9} {'held':>10} {'hold ends':>10}")
        for call in status.calls:
            lines.append(
                f"  {call.call_id[:36]:<36} {call.seconds_running:>7}s {call.rate_pence_per_minute:>8}p "
                f"{format_pence(call.hold_pence):>10} {call.expires_in_s:>9}s"
            )
    return "\n".join(lines)


def render_deployment(status: DeploymentStatus) -> str:
    lag = "unknown" if status.outbox_lag_ms is None else f"{status.outbox_lag_ms} ms"
    lines = [
        f"credit-engine status at {status.redis_time} (Redis time)",
        f"  worker   {status.worker}",
        f"  ledger   {status.outbox_entries} entries waiting, lag {lag}, {status.ledger_entries_written} written by the worker",
        f"  calls    {status.live_calls} live in {status.orgs_with_live_calls} orgs",
    ]
    if status.busiest:
        lines.append(f"  {'org':<24} {'calls':>5} {'balance':>12} {'available':>12} {'runs out in':>12}")
        for org in status.busiest:
            lines.append(
                f"  {org.org_id[:24]:<24} {len(org.calls):>5} {format_pence(org.balance_pence):>12} "
                f"{format_pence(org.available_pence):>12} {_runs_out(org.credit_runs_out_in_s):>12}"
            )
    return "\n".join(lines)
