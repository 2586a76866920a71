"""The worker's doorbell: which orgs' outboxes may hold entries, split into shards (engine/keys.py)
so that on a Redis Cluster no one master takes every decision's ring.

Scripts' callers ring an org's shard; the worker pops from every non-empty shard. The doorbell is
only a hint: the worker's sweep asks each org's own stream, so a ring lost with its shard (a
master restarted empty) delays an entry until the next sweep, never loses it.
"""

from collections import defaultdict

from credit_engine.engine.keys import hint_shard
from credit_engine.engine.killswitch import file_depletion
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime


async def ring(rt: Runtime, org_ids: list[str]) -> None:
    by_shard: dict[int, list[str]] = defaultdict(list)
    for org_id in org_ids:
        by_shard[hint_shard(org_id)].append(org_id)
    shards = rt.keys.outbox_dirty_shards
    async with rt.redis.pipeline(transaction=False) as pipe:
        for shard, members in by_shard.items():
            pipe.sadd(shards[shard], *members)
        await pipe.execute()


async def pop_rung(rt: Runtime, count_max: int) -> list[str]:
    """Up to `count_max` rung orgs, shared fairly between the shards that have any; each org is
    handed to one caller (SPOP), which must ring it again if it does not drain it."""
    assert count_max > 0
    shards = rt.keys.outbox_dirty_shards
    async with rt.redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            pipe.scard(shard)
        sizes = await pipe.execute()
    rung = [(shard, size) for shard, size in zip(shards, sizes, strict=True) if size > 0]
    if not rung:
        return []
    share = max(1, count_max // len(rung))
    async with rt.redis.pipeline(transaction=False) as pipe:
        for shard, size in rung[:count_max]:
            pipe.spop(shard, min(size, share))
        popped = await pipe.execute(raise_on_error=False)
    # Keep what was popped from the shards that answered (their rings are ours now); a shard
    # that failed keeps its members for the next round.
    org_ids = [org_id for members in popped if not isinstance(members, Exception) for org_id in members]
    errors = [members for members in popped if isinstance(members, Exception)]
    if errors and not org_ids:
        raise errors[0]
    return org_ids


async def adopt_unsharded_hints(rt: Runtime) -> int:
    """Move the hints an earlier release kept in one key each (`<prefix>:outbox:dirty`,
    `<prefix>:killswitch:due`) into the shards, once at the worker's start. Returns how many."""
    doorbell, schedule = f"{rt.keys.prefix}:outbox:dirty", f"{rt.keys.prefix}:killswitch:due"
    org_ids = list(await asyncio_reply(rt.redis.smembers(doorbell)))
    if org_ids:
        await ring(rt, org_ids)
    filed = await rt.redis.zrange(schedule, 0, -1, withscores=True)
    for org_id, depletion_ms in filed:
        await file_depletion(rt, org_id, int(depletion_ms))
    await rt.redis.delete(doorbell, schedule)
    return len(org_ids) + len(filed)
