"""What every operation needs: Redis, Postgres, the scripts, the keyspace, the clock, settings."""

from dataclasses import dataclass

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.clock import Clock, RedisClock
from engine.config import Settings
from engine.db import create_pool
from engine.keys import Keyspace
from engine.scripts import ScriptRunner

redis_retries_max = 3


def redis_client(url: str, pool_size: int) -> Redis:
    # Retrying after a dropped connection is safe for every command we send: each script is
    # idempotent by its key (a retried deduction or commit is a replay, never a second charge).
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=5,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), redis_retries_max),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    pg: asyncpg.Pool
    keys: Keyspace
    scripts: ScriptRunner
    clock: Clock

    @classmethod
    async def open(cls, settings: Settings, *, clock: Clock | None = None) -> "Runtime":
        if settings.redis_url is None or settings.database_url is None:
            raise ValueError("REDIS_URL and DATABASE_URL must be set (or use `credit-engine up`)")
        redis = redis_client(settings.redis_url, settings.redis_pool_size)
        scripts = ScriptRunner()
        try:
            await scripts.load(redis)
            pg = await create_pool(settings.database_url, settings.pg_pool_size)
        except BaseException:
            await redis.aclose()
            raise
        return cls(
            settings=settings,
            redis=redis,
            pg=pg,
            keys=Keyspace(settings.key_prefix),
            scripts=scripts,
            clock=clock or RedisClock(),
        )

    async def close(self) -> None:
        await self.pg.close()
        await self.redis.aclose()
