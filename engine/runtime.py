"""What every operation needs: Redis, Postgres, the scripts, the keyspace, the clock, settings."""

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from credit_engine.engine.clock import Clock, RedisClock
from credit_engine.engine.config import Settings
from credit_engine.engine.db import create_pool
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.org_profiles import ProfileCache
from credit_engine.engine.scripts import ScriptRunner

redis_retries_max = 3


pool_wait_timeout_s = 5.0


async def acquire_within(slots: asyncio.Semaphore, timeout_s: float) -> None:
    """Take a slot, waiting at most `timeout_s`; no timer at all unless it has to wait."""
    if not slots.locked():
        await slots.acquire()
        return
    try:
        await asyncio.wait_for(slots.acquire(), timeout_s)
    except TimeoutError:
        raise RedisError(f"no Redis connection free within {timeout_s}s") from None


class BoundedConnectionPool(ConnectionPool):
    """At most `max_connections` connections; a caller past that waits for one (up to
    `pool_wait_timeout_s`) instead of failing. redis-py's BlockingConnectionPool does the same
    with a Condition and a timeout context on every command, which cost ~10% of the status
    check's CPU; a semaphore costs nothing until it actually has to wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        await acquire_within(self._slots, pool_wait_timeout_s)
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


_holding_slot: ContextVar[bool] = ContextVar("credit_engine_redis_slot", default=False)


class BoundedRedisCluster(RedisCluster):
    """At most `commands_max` commands or pipelines at once; past that a caller waits its turn
    (as BoundedConnectionPool makes the plain client do) instead of failing. Each holds at most one
    connection per node, so that bounds every node's connections too.

    The nodes' own pools are deliberately left unbounded: redis-py 5.3's cluster node keeps a
    connection counted against its pool when a command on it is cancelled (redis-py #4110), so a
    capped pool would, after enough timed-out requests, refuse every command to that node for
    good. The connections it forgets are closed, so leaving the count unbounded costs no sockets.
    A command the client sends on its own while running one of ours (a pipeline's retry after
    MOVED) does not queue again."""

    def __init__(self, *args: Any, commands_max: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(commands_max)

    async def bounded(self, run: Callable[[], Awaitable[Any]]) -> Any:
        if _holding_slot.get():
            return await run()
        await acquire_within(self._slots, pool_wait_timeout_s)
        token = _holding_slot.set(True)
        try:
            return await run()
        finally:
            _holding_slot.reset(token)
            self._slots.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.bounded(lambda: super(BoundedRedisCluster, self).execute_command(*args, **kwargs))

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> "BoundedClusterPipeline":
        super().pipeline(transaction, shard_hint)  # its checks: no MULTI, no shard hint
        return BoundedClusterPipeline(self)  # type: ignore[abstract]  # redis-py's own ClusterPipeline leaves connection_pool abstract


class BoundedClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self._client
        assert isinstance(client, BoundedRedisCluster)
        run = super().execute
        return await client.bounded(lambda: run(raise_on_error, allow_redirections))  # type: ignore[no-any-return]


def redis_client(url: str, pool_size: int, socket_timeout_s: float | None = 5.0, *, cluster: bool = False) -> Redis:
    """Retrying after a dropped connection is safe for every command we send: each script is
    idempotent by its key (a retried deduction or commit is a replay, never a second charge).
    So no health checks: a connection Redis dropped fails once and is replaced by the retry.

    socket_timeout_s=None leaves commands without a timeout of their own: the web app bounds
    whole requests instead (two timers per command cost a fifth of the status check's speed).

    cluster=True: `url` is one node of a Redis Cluster; the client learns the others and routes
    each command by its key's slot (every script's keys share one slot: engine/keys.py), with at
    most `pool_size` connections to each node."""
    if cluster:
        return BoundedRedisCluster.from_url(  # type: ignore[return-value]
            url,
            commands_max=pool_size,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=2,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), redis_retries_max),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
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


async def ping_redis(redis: Redis) -> None:
    """A health probe: returns once Redis answers PING; raises whatever kept it from answering."""
    await redis.ping()


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    pg: asyncpg.Pool
    keys: Keyspace
    scripts: ScriptRunner
    clock: Clock
    profiles: ProfileCache = field(default_factory=ProfileCache)  # orgs' Vapi profiles (engine/org_profiles.py)

    @classmethod
    async def open(
        cls, settings: Settings, *, clock: Clock | None = None, redis_socket_timeout_s: float | None = 5.0
    ) -> "Runtime":
        if settings.redis_url is None or settings.database_url is None:
            raise ValueError("REDIS_URL and DATABASE_URL must be set (or use `credit-engine up`)")
        redis = redis_client(
            settings.redis_url, settings.redis_pool_size, redis_socket_timeout_s, cluster=settings.redis_cluster
        )
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
