"""Redis can always be rebuilt from Postgres, and the reconciler sees and repairs drift."""

import asyncio

from engine.assets import deduct_asset
from engine.balances import read_wallet
from engine.holds import CallEvent, check_call, commit_call, live_holds, reserve_call
from engine.orgs import update_org
from engine.outbox import drain_org_fully
from engine.reconciler import check, repair
from engine.restore import ensure_rebuilt, state_present
from engine.results import Outcome
from engine.runtime import Runtime
from tests.conftest import delete_prefix
from tests.helpers import new_org


async def flush_redis(rt: Runtime) -> None:
    """Redis loses everything this test wrote (as a restart without persistence would)."""
    assert rt.settings.redis_url is not None
    await delete_prefix(rt.settings.redis_url, rt.settings.key_prefix)


async def test_flushed_redis_is_rebuilt_with_balances_holds_and_idempotency(rt: Runtime) -> None:
    orgs = [await new_org(rt, 1000 * (i + 1)) for i in range(3)]
    await deduct_asset(rt, orgs[0], "a", 100)
    await reserve_call(rt, orgs[1], "live-call")
    await check_call(rt, orgs[1], "live-call", CallEvent.start)
    await reserve_call(rt, orgs[2], "done-call")
    await commit_call(rt, orgs[2], "done-call", 60)
    for org in orgs:
        await drain_org_fully(rt, org)
    before = {org: await read_wallet(rt, org) for org in orgs}
    holds_before = await live_holds(rt, orgs[1])

    await flush_redis(rt)
    assert not await state_present(rt)
    assert (await deduct_asset(rt, orgs[0], "b", 1)).outcome == Outcome.org_unknown  # refused, not guessed
    report = await ensure_rebuilt(rt)
    assert report.rebuilt_here and report.orgs_restored == 3

    assert {org: await read_wallet(rt, org) for org in orgs} == before
    assert await live_holds(rt, orgs[1]) == holds_before
    # Replays are still recognised after the rebuild.
    assert (await deduct_asset(rt, orgs[0], "a", 100)).outcome == Outcome.replayed
    assert (await reserve_call(rt, orgs[1], "live-call")).outcome == Outcome.replayed
    assert (await commit_call(rt, orgs[2], "done-call", 60)).outcome == Outcome.replayed
    assert (await check(rt)).clean


async def test_a_second_rebuild_is_a_no_op_and_concurrent_rebuilds_rebuild_once(rt: Runtime) -> None:
    await new_org(rt, 500)
    await flush_redis(rt)
    reports = await asyncio.gather(*[ensure_rebuilt(rt) for _ in range(5)])
    assert sum(1 for r in reports if r.rebuilt_here) == 1
    assert not (await ensure_rebuilt(rt)).rebuilt_here


async def test_check_counts_entries_still_in_the_outbox(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 100)
    await reserve_call(rt, org, "c")
    await commit_call(rt, org, "d", 30)
    assert await rt.redis.xlen(rt.keys.org(org).outbox) > 0  # not drained
    assert (await check(rt, [org])).clean


async def test_check_reports_drift_and_repair_fixes_it(rt: Runtime) -> None:
    good, bad_balance, bad_hold, bad_settings, missing = [await new_org(rt, 1000) for _ in range(5)]
    await rt.redis.hincrby(rt.keys.org(bad_balance).org, "balance_pence", 250)
    await reserve_call(rt, bad_hold, "c")
    await drain_org_fully(rt, bad_hold)
    await rt.redis.hdel(rt.keys.org(bad_hold).holds, "c")
    await rt.redis.hset(rt.keys.org(bad_settings).org, "rate_pence_per_minute", 1)
    for key in rt.keys.org(missing).all():
        await rt.redis.delete(key)

    report = await check(rt)
    drifted = {d.org_id: d.problems for d in report.drifted}
    assert set(drifted) == {bad_balance, bad_hold, bad_settings, missing}
    assert any("balance_pence: redis 1250, postgres says 1000" in p for p in drifted[bad_balance])
    assert any("live holds" in p for p in drifted[bad_hold])
    assert any("held_pence" in p for p in drifted[bad_hold])
    assert any("settings" in p for p in drifted[bad_settings])
    assert drifted[missing] == ["missing in redis"]

    repaired = await repair(rt)
    assert set(repaired.repaired) == set(drifted)
    assert repaired.after.clean
    assert (await check(rt)).clean
    wallet = await read_wallet(rt, bad_balance)
    assert wallet is not None and wallet.balance_pence == 1000
    assert set(await live_holds(rt, bad_hold)) == {"c"}


async def test_check_stays_clean_while_money_moves(rt: Runtime) -> None:
    """A check during live traffic compares one instant: no false drift."""
    orgs = [await new_org(rt, 100_000) for _ in range(4)]
    stop = asyncio.Event()

    async def traffic(org: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            await deduct_asset(rt, org, f"k{i}", 1)
            if i % 3 == 0:
                await drain_org_fully(rt, org)

    tasks = [asyncio.create_task(traffic(org)) for org in orgs]
    try:
        for _ in range(5):
            report = await check(rt, orgs)
            assert not report.drifted, report.drifted
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_settings_changes_reach_redis(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await update_org(rt, org, {"rate_pence_per_minute": 600, "max_concurrent_calls": 1})
    reservation = await reserve_call(rt, org, "c1")
    assert reservation.max_duration_s == 100  # 1000p at 10p/s
    assert (await reserve_call(rt, org, "c2")).outcome == Outcome.too_many_calls
    assert (await check(rt, [org])).clean


async def test_a_refused_restore_does_not_mark_a_pending_credit_as_applied(rt: Runtime) -> None:
    from dataclasses import replace as dc_replace

    from engine.credits import apply_pending_credits, credit
    from engine.embedded import free_port
    from engine.restore import restore_orgs, snapshot_orgs
    from engine.runtime import redis_client

    org = await new_org(rt, 1000)
    dead = redis_client(f"redis://127.0.0.1:{free_port()}/0", 2)
    try:
        assert not (await credit(dc_replace(rt, redis=dead), org, "pay-1", 500)).applied
    finally:
        await dead.aclose()
    snapshot = (await snapshot_orgs(rt, [org]))[org]
    # A restore that cannot happen (the org is in Redis already) must leave no trace that says
    # the credit is applied, or the worker would take it for a replay and Redis would never get it.
    assert (await restore_orgs(rt, [snapshot], "absent"))[org] == Outcome.restore_conflict
    assert (await apply_pending_credits(rt, older_than_ms=0)).applied == 1
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 1500
    assert (await check(rt, [org])).clean
