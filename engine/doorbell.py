"""The worker's doorbell: which orgs' outboxes may hold entries, split into shards (engine/keys.py)
so that on a Redis Cluster no one master takes every decision's ring.

Scripts' callers ring an org's shard; the worker pops from every non-empty shard. The doorbell is
only a hint: the worker's sweep asks each org's own stream, so a ring lost with its shard (a
master restarted empty) delays an entry until the next sweep, never loses it.
"""

from collections import defaultdict

from engine.keys import hint_shard
from engine.runtime import Runtime


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
        popped = await pipe.execute()
    return [org_id for members in popped for org_id in members]
