"""What every operation needs: Redis, Postgres, the scripts, the keyspace, the clock, settings."""

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.clock import Clock, RedisClock
from engine.config import Settings
from engine.db import create_pool
from engine.keys import Keyspace
from engine.scripts import ScriptRunner

redis_retries_max = 3


pool_wait_timeout_s = 5.0


class BoundedConnectionPool(ConnectionPool):
    """At most `max_connections` connections; a caller past that waits for one (up to
    `pool_wait_timeout_s`) instead of failing. redis-py's BlockingConnectionPool does the same
    with a Condition and a timeout context on every command, which cost ~10% of the status
    check's CPU; a semaphore costs nothing until it actually has to wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), pool_wait_timeout_s)
            except TimeoutError:
                raise RedisError(f"no Redis connection free within {pool_wait_timeout_s}s") from None
        else:
            await self._slots.acquire()
        try:
            return await super().get_connection()
        except BaseException:
            self._slots.release()
            raise

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            self._slots.release()


def redis_client(url: str, pool_size: int, socket_timeout_s: float | None = 5.0) -> Redis:
    """Retrying after a dropped connection is safe for every command we send: each script is
    idempotent by its key (a retried deduction or commit is a replay, never a second charge).
    So no health checks: a connection Redis dropped fails once and is replaced by the retry.

    socket_timeout_s=None leaves commands without a timeout of their own: the web app bounds
    whole requests instead (two timers per command cost a fifth of the status check's speed)."""
    pool = BoundedConnectionPool.from_url(
        url,
        max_connections=pool_size,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=2,
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
    async def open(
        cls, settings: Settings, *, clock: Clock | None = None, redis_socket_timeout_s: float | None = 5.0
    ) -> "Runtime":
        if settings.redis_url is None or settings.database_url is None:
            raise ValueError("REDIS_URL and DATABASE_URL must be set (or use `credit-engine up`)")
        redis = redis_client(settings.redis_url, settings.redis_pool_size, redis_socket_timeout_s)
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
