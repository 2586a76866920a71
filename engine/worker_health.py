"""Is an arq worker alive? arq refreshes a health-check key in its own Redis (engine/config.py's
arq_url), which on a Redis Cluster deployment is not the engine's Redis."""

from redis.asyncio import Redis

from credit_engine.engine.config import ConfigError, Settings
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.replies import asyncio_reply


async def worker_stats(redis: Redis, keys: Keyspace) -> dict[str, int]:
    """The figures the worker last reported in Redis (outbox entries, heartbeat, ...), by name."""
    raw = await asyncio_reply(redis.hgetall(keys.worker_stats))
    return {name: int(value) for name, value in raw.items()}


async def arq_health_check_present(settings: Settings, redis: Redis) -> bool | None:
    """None when the worker's Redis is not configured here (a cluster without CREDIT_ENGINE_ARQ_REDIS_URL)."""
    key = Keyspace(settings.key_prefix).arq_queue + ":health-check"
    try:
        url = settings.arq_url
    except ConfigError:
        return None
    if url == settings.redis_url and not settings.redis_cluster:
        return bool(await redis.exists(key))
    arq_redis = Redis.from_url(url, decode_responses=True, socket_connect_timeout=2)
    try:
        return bool(await arq_redis.exists(key))
    finally:
        await arq_redis.aclose()
