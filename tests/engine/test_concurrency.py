"""The seed's race scenarios with real concurrency: 4 OS processes, one connection per request."""

import asyncio

from credit_engine.engine.balances import read_wallet
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import check
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org
from tests.race_clients import race


async def asset_entries(rt: Runtime, org_id: str) -> int:
    return await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE org_id = $1 AND kind = 'asset'", org_id)


async def test_100_concurrent_deductions_of_the_whole_balance_exactly_one_succeeds(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    ops = [("deduct", org, f"provision-{i}", 1000) for i in range(100)]
    results = await asyncio.to_thread(race, rt.settings, ops)
    outcomes = [r["outcome"] for r in results]
    assert outcomes.count("ok") == 1
    assert outcomes.count("insufficient_funds") == 99
    assert all(int(r["available"]) >= 0 for r in results)
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 0
    await drain_org_fully(rt, org)
    assert await asset_entries(rt, org) == 1
    assert (await check(rt, [org])).clean


async def test_50_concurrent_reserves_of_one_call_make_exactly_one_hold(rt: Runtime) -> None:
    org = await new_org(rt, 10_000)
    ops = [("reserve", org, "call-1", 0) for _ in range(50)]
    results = await asyncio.to_thread(race, rt.settings, ops)
    outcomes = [r["outcome"] for r in results]
    assert outcomes.count("ok") == 1
    assert outcomes.count("replayed") == 49
    assert len({r["hold"] for r in results}) == 1
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.held_pence == results[0]["hold"] and wallet.live_calls == 1
    await drain_org_fully(rt, org)
    assert await rt.pg.fetchval("SELECT count(*) FROM call_holds WHERE org_id = $1", org) == 1


async def test_25_deductions_and_25_reserves_racing_never_take_more_than_fits(rt: Runtime) -> None:
    # 2000p fits two operations of 1000p: a deduction of 1000p or a 5-minute hold at 200p/min.
    org = await new_org(rt, 2000, rate_pence_per_minute=200, hold_block_minutes=5)
    ops = [("deduct", org, f"provision-{i}", 1000) for i in range(25)]
    ops += [("reserve", org, f"call-{i}", 0) for i in range(25)]
    results = await asyncio.to_thread(race, rt.settings, ops)
    succeeded = [r for r in results if r["outcome"] == "ok"]
    # Every success takes exactly 1000p, so exactly two fit (never a third, never fewer).
    assert len(succeeded) == 2
    assert all(int(r["available"]) >= 0 for r in results)
    taken = sum(1000 if r["kind"] == "deduct" else int(r["hold"]) for r in succeeded)
    assert taken == 2000
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.available_pence == 0
    await drain_org_fully(rt, org)
    assert (await check(rt, [org])).clean
