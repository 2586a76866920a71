"""Clients for race tests: each runs in its own OS process with its own Redis connections, and
fires its share of operations at once when every process has reached the barrier."""

import asyncio
import multiprocessing
from dataclasses import replace
from typing import Any

from redis.asyncio import RedisCluster

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.clock import RedisClock
from credit_engine.engine.config import Settings
from credit_engine.engine.holds import reserve_call
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.runtime import Runtime, redis_client
from credit_engine.engine.scripts import ScriptRunner


async def _fire(settings: Settings, ops: list[tuple[str, str, str, int]], barrier: Any) -> list[dict[str, int | str]]:
    assert settings.redis_url is not None
    redis = redis_client(settings.redis_url, pool_size=len(ops) + 1, cluster=settings.redis_cluster)
    scripts = ScriptRunner()
    await scripts.load(redis)
    rt = Runtime(
        settings=settings, redis=redis, pg=None, keys=Keyspace(settings.key_prefix), scripts=scripts, clock=RedisClock()
    )  # type: ignore[arg-type]
    # Open every connection before the barrier, so the race is between requests, not connects.
    if isinstance(redis, RedisCluster):  # a pool per node: concurrent pings open them on every node
        await asyncio.gather(*[redis.ping(target_nodes=RedisCluster.ALL_NODES) for _ in ops])
    else:
        connections = [await redis.connection_pool.get_connection("PING") for _ in ops]
        for connection in connections:
            await redis.connection_pool.release(connection)
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait)

    async def one(kind: str, org_id: str, key: str, amount: int) -> dict[str, int | str]:
        if kind == "deduct":
            result = await deduct_asset(rt, org_id, key, amount)
            return {"kind": kind, "outcome": result.outcome.name, "available": result.money.available_pence}
        reservation = await reserve_call(rt, org_id, key)
        return {
            "kind": kind,
            "outcome": reservation.outcome.name,
            "available": reservation.money.available_pence,
            "hold": reservation.hold_pence,
        }

    try:
        return await asyncio.gather(*[one(*op) for op in ops])
    finally:
        await redis.aclose()


def _process_main(settings: Settings, ops: list[tuple[str, str, str, int]], barrier: Any, results: Any) -> None:
    results.put(asyncio.run(_fire(settings, ops, barrier)))


def race(settings: Settings, ops: list[tuple[str, str, str, int]], processes: int = 4) -> list[dict[str, int | str]]:
    """Run `ops` (kind, org_id, key, amount) split over `processes` OS processes, all at once."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    shares = [ops[i::processes] for i in range(processes)]
    workers = [
        context.Process(target=_process_main, args=(replace(settings), share, barrier, results)) for share in shares
    ]
    for worker in workers:
        worker.start()
    collected: list[dict[str, int | str]] = []
    for _ in workers:
        collected.extend(results.get(timeout=120))
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    return collected
