"""The drain loop and the sweep, in-process against real Redis and Postgres."""

import pytest

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.holds import reserve_call
from credit_engine.engine.outbox import drain_orgs
from credit_engine.engine.runtime import Runtime
from credit_engine.worker.drainer import Drainer
from tests.helpers import new_org
from tests.lua.conftest import seed_org


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
    import asyncio

    from credit_engine.engine import limits

    entries = 2 * limits.settle_batch_size_max + 100
    org = await new_org(rt, 10 * entries)
    for start in range(0, entries, 500):
        await asyncio.gather(*[deduct_asset(rt, org, f"a{i}", 1) for i in range(start, min(start + 500, entries))])
    drainer = Drainer(rt)
    rounds = 0
    while await drainer.drain_round():
        rounds += 1
    assert rounds == 3  # a full batch, a full batch, the rest
    assert await ledger_count(rt, org) == entries + 1


async def test_the_sweep_finds_entries_whose_doorbell_was_lost(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 10)
    await reserve_call(rt, org, "c")
    await rt.redis.delete(*rt.keys.outbox_dirty_shards)  # as if a worker died after SPOP
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


async def test_an_entry_the_ledger_refuses_is_kept_aside_and_the_rest_of_its_org_flows(rt: Runtime) -> None:
    from credit_engine.engine.reconciler import check, repair

    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "before", 10)
    # An entry Postgres refuses (an amount beyond the ledger's bound), between two good ones.
    await rt.redis.xadd(
        rt.keys.org(org).outbox,
        {
            "t": "L",
            "o": org,
            "k": f"{org}/asset/poison",
            "kind": "asset",
            "a": str(-(10**13)),
            "dd": "0",
            "b": "0",
            "db": "0",
            "c": "",
            "bs": "0",
            "r": "0",
            "fp": "",
            "m": "",
            "ms": "1750000000000",
            "s": "99",
        },
    )
    await deduct_asset(rt, org, "after", 20)
    result = await drain_orgs(rt, [org])
    assert result.orgs_dead_lettered == [org]
    kinds = await rt.pg.fetch("SELECT idempotency_key FROM ledger_entries WHERE org_id = $1 ORDER BY id", org)
    assert [r["idempotency_key"].rsplit("/", 1)[1] for r in kinds] == [f"seed-{org}", "before", "after"]
    assert await rt.redis.xlen(rt.keys.org(org).outbox) == 0
    assert await rt.redis.xlen(rt.keys.org(org).dead) == 1
    # Not silently fine: the check says Redis has something Postgres refused.
    report = await check(rt, [org])
    assert any("dead letters" in p for d in report.drifted for p in d.problems)
    repaired = await repair(rt, [org])
    assert repaired.after.clean
    assert await rt.redis.xlen(rt.keys.org(org).dead) == 0
    reject = await rt.pg.fetchrow("SELECT reason FROM ledger_rejects WHERE org_id = $1", org)
    assert reject["reason"].startswith("dead_letter: CheckViolationError")


async def test_the_drain_loop_survives_an_unexpected_error(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import credit_engine.worker.drainer as drainer_module

    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 10)
    real = drainer_module.drain_orgs
    calls = {"n": 0}

    async def broken_once(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(drainer_module, "drain_orgs", broken_once)
    monkeypatch.setattr(drainer_module, "backoff_s_min", 0.01)
    drainer = Drainer(rt)
    task = asyncio.create_task(drainer.run_forever())
    for _ in range(200):
        if await ledger_count(rt, org) == 2:
            break
        await asyncio.sleep(0.01)
    drainer.stop()
    await task
    assert await ledger_count(rt, org) == 2
    assert drainer.stats.errors == 1


async def test_hints_an_earlier_release_kept_in_one_key_are_moved_into_the_shards(rt: Runtime) -> None:
    from credit_engine.engine.doorbell import adopt_unsharded_hints, pop_rung

    orgs = [await new_org(rt, 1000) for _ in range(20)]
    for org in orgs:
        await deduct_asset(rt, org, "a", 10)
    await rt.redis.delete(*rt.keys.outbox_dirty_shards, *rt.keys.kill_schedule_shards)
    await rt.redis.sadd(f"{rt.keys.prefix}:outbox:dirty", *orgs)  # as the old release rang them
    await rt.redis.zadd(f"{rt.keys.prefix}:killswitch:due", {org: 1_000 + i for i, org in enumerate(orgs)})
    assert await adopt_unsharded_hints(rt) == 40
    assert not await rt.redis.exists(f"{rt.keys.prefix}:outbox:dirty", f"{rt.keys.prefix}:killswitch:due")
    assert sorted(await pop_rung(rt, 128)) == sorted(orgs)
    assert {org: await rt.redis.zscore(rt.keys.kill_schedule(org), org) for org in orgs} == {
        org: 1_000 + i for i, org in enumerate(orgs)
    }
    assert await Drainer(rt).drain_round() == 0  # popped above: nothing rung twice
    assert await adopt_unsharded_hints(rt) == 0


async def test_a_malformed_entry_is_dead_lettered_alone_and_stalls_no_org(rt: Runtime) -> None:
    """An entry the writer cannot even read (a field missing, meta that is not JSON) goes to its
    org's dead letters with the reason; the entries around it, and other orgs' in the same batch,
    are written."""
    bad, good = await new_org(rt, 1000), await new_org(rt, 1000)
    await deduct_asset(rt, bad, "before", 10)
    await rt.redis.xadd(
        rt.keys.org(bad).outbox, {"t": "L", "o": bad, "k": f"{bad}/asset/broken", "kind": "asset", "m": "{not json"}
    )
    await deduct_asset(rt, bad, "after", 20)
    await deduct_asset(rt, good, "a", 30)
    result = await drain_orgs(rt, [bad, good])
    assert result.written.inserted == 3
    assert await ledger_count(rt, bad) == 3 and await ledger_count(rt, good) == 2  # top-ups and deductions
    assert await rt.redis.xlen(rt.keys.org(bad).outbox) == 0
    (dead,) = await rt.redis.xrange(rt.keys.org(bad).outbox + ":dead")
    assert dead[1]["k"] == f"{bad}/asset/broken" and dead[1]["reason"].startswith("malformed entry")
