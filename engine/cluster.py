"""What the engine needs to know about a Redis Cluster beyond routing: which masters there are.

Keys outside any org live on whichever node their slot maps to, so a fact kept in one such key
survives the loss of every other node. The state marker must not: after a node restarts empty,
its orgs are gone while a marker elsewhere would still say "rebuilt". So a rebuild on a cluster
marks every slot, each marker named with a hash tag chosen to land in it, and the state check
looks at each master's lowest slot (engine/restore.py).
"""

from functools import cache
from typing import TypeGuard

from redis.asyncio import Redis, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot


def is_cluster(redis: Redis) -> TypeGuard[RedisCluster]:
    return isinstance(redis, RedisCluster)


@cache
def _tag_by_slot() -> dict[int, str]:
    """A short tag hashing to each slot (about 110k CRC16s, once per process, tens of ms)."""
    tags: dict[int, str] = {}
    n = 0
    while len(tags) < REDIS_CLUSTER_HASH_SLOTS:
        tags.setdefault(key_slot(str(n).encode()), str(n))
        n += 1
    return tags


def slot_tag(slot: int) -> str:
    return _tag_by_slot()[slot]


async def master_slots(redis: RedisCluster) -> list[int]:
    """For each master the client knows, the lowest slot it serves (the client refreshes its map
    when a node answers MOVED)."""
    await redis.initialize()  # a no-op once connected
    first: dict[str, int] = {}
    for slot, nodes in sorted(redis.nodes_manager.slots_cache.items()):
        first.setdefault(nodes[0].name, slot)
    return sorted(first.values())
