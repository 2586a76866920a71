"""The drain loop and the sweep, in-process against real Redis and Postgres."""

from engine.assets import deduct_asset
from engine.holds import reserve_call
from engine.outbox import drain_orgs
from engine.runtime import Runtime
from tests.helpers import new_org
from tests.lua.conftest import seed_org
from worker.drainer import Drainer


async def ledger_count(rt: Runtime, org_id: str) -> int:
    return await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE org_id = $1", org_id)


async def test_a_round_drains_the_rung_orgs_in_one_batch(rt: Runtime) -> None:
    orgs = [await new_org(rt, 1000) for _ in range(5)]
    for org in orgs:
        await deduct_asset(rt, org, "a", 10)
    drainer = Drainer(rt)
    assert await drainer.drain_round() == 5
    assert drainer.stats.batches == 1 and drainer.stats.entries_written == 5
    assert await drainer.drain_round() == 0
    for org in orgs:
        assert await ledger_count(rt, org) == 2  # the top-up and the deduction


async def test_an_org_with_more_than_a_batch_is_rung_again_until_empty(rt: Runtime) -> None:
    org = await new_org(rt, 10_000)
    for i in range(1_200):
        await deduct_asset(rt, org, f"a{i}", 1)
    drainer = Drainer(rt)
    rounds = 0
    while await drainer.drain_round():
        rounds += 1
    assert rounds == 3  # 500 + 500 + 200
    assert await ledger_count(rt, org) == 1_201


async def test_the_sweep_finds_entries_whose_doorbell_was_lost(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 10)
    await reserve_call(rt, org, "c")
    await rt.redis.delete(rt.keys.outbox_dirty)  # as if a worker died after SPOP
    drainer = Drainer(rt)
    assert await drainer.drain_round() == 0
    assert drainer.stats.outbox_entries == 0
    assert await drainer.sweep() == 1
    assert drainer.stats.outbox_entries == 2
    assert await drainer.drain_round() == 2
    assert await ledger_count(rt, org) == 2
    stats = await rt.redis.hgetall(rt.keys.worker_stats)
    assert int(stats["outbox_entries"]) == 2 and int(stats["heartbeat_ms"]) > 0


async def test_an_org_whose_entries_cannot_be_written_does_not_block_the_others(rt: Runtime) -> None:
    good = await new_org(rt, 1000)
    stray = await seed_org(rt, 1000)  # in Redis only: Postgres has never heard of it
    await deduct_asset(rt, good, "a", 10)
    await deduct_asset(rt, stray, "a", 10)
    result = await drain_orgs(rt, [good, stray])
    assert result.orgs_failed == [stray]
    assert await ledger_count(rt, good) == 2
    assert await rt.redis.xlen(rt.keys.org(good).outbox) == 0
    assert await rt.redis.xlen(rt.keys.org(stray).outbox) == 1  # kept, not dropped
