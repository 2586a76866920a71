"""Redis can always be rebuilt from Postgres, and the reconciler sees and repairs drift."""

import asyncio

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.credits import credit
from credit_engine.engine.holds import CallEvent, check_call, commit_call, expire_call, live_holds, reserve_call
from credit_engine.engine.idempotency import call_state_key
from credit_engine.engine.orgs import update_org
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import check, repair
from credit_engine.engine.restore import (
    ensure_rebuilt,
    restore_org_if_absent,
    restore_orgs,
    snapshot_orgs,
    state_present,
)
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.conftest import delete_prefix
from tests.helpers import assert_books_agree, new_org


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

    from credit_engine.engine.credits import apply_pending_credits, credit
    from credit_engine.engine.embedded import free_port
    from credit_engine.engine.restore import restore_orgs, snapshot_orgs
    from credit_engine.engine.runtime import redis_client

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


async def _committed_in_redis_expired_in_postgres(rt: Runtime, clock: ManualClock) -> str:
    """A call that expired (and Postgres knows it), then a late report committed it in Redis: that
    commit is still on its way to the ledger, so Postgres says 'expired' and Redis 'committed'."""
    org = await new_org(rt, 1000)
    assert (await reserve_call(rt, org, "late")).outcome == Outcome.ok
    await check_call(rt, org, "late", CallEvent.start)
    clock.advance(30_000)
    await check_call(rt, org, "late", CallEvent.end)
    clock.advance(rt.settings.hold_report_slack_ms + 1)
    assert (await expire_call(rt, org, "late")).charged_pence == 30
    await drain_org_fully(rt, org)
    assert (await commit_call(rt, org, "late", 45)).outcome == Outcome.adjusted  # +15p, not yet drained
    return org


async def test_a_restore_that_does_not_happen_leaves_the_orgs_records_alone(rt: Runtime, clock: ManualClock) -> None:
    """Three ways a restore is refused: a rebuild over an org that is present, two processes
    bringing the same org in, a repair whose org moved on. None may set the call back to
    'expired' (a replayed report would then settle it a second time)."""
    org = await _committed_in_redis_expired_in_postgres(rt, clock)
    snapshot = (await snapshot_orgs(rt, [org]))[org]
    assert await restore_org_if_absent(rt, org) == Outcome.restore_conflict  # present: another process has it
    assert (await restore_orgs(rt, [snapshot], "absent"))[org] == Outcome.restore_conflict  # a rebuild over it
    assert (await restore_orgs(rt, [snapshot], "seq", expected_seq=1))[org] == Outcome.restore_conflict  # a repair
    replay = await commit_call(rt, org, "late", 45)
    assert (replay.outcome, replay.charged_pence) == (Outcome.replayed, 45)
    assert await assert_books_agree(rt, org) == 1000 - 45
    kinds = await rt.pg.fetch(
        "SELECT kind, amount_pence FROM ledger_entries WHERE org_id = $1 AND call_id = 'late' ORDER BY id", org
    )
    assert [(r["kind"], r["amount_pence"]) for r in kinds] == [("call_expired", -30), ("call_adjustment", -15)]
    # Nothing staged is left behind in Redis.
    assert not [key async for key in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*:restore:*")]


async def test_check_compares_call_resolutions_in_redis_with_postgres(rt: Runtime, clock: ManualClock) -> None:
    org = await _committed_in_redis_expired_in_postgres(rt, clock)
    assert (await check(rt, [org])).clean  # the commit is on its way: not drift
    await drain_org_fully(rt, org)
    assert (await check(rt, [org])).clean
    # Redis set back to what Postgres said before the late report (what a refused restore did).
    await rt.redis.hset(rt.keys.org(org).idem, call_state_key(org, "late"), "expired|30|30|60")
    (drift,) = (await check(rt, [org])).drifted
    assert any("late" in problem and "committed" in problem for problem in drift.problems), drift.problems
    # A resolution Redis has forgotten inside the window (a replay would bill it again).
    await rt.redis.hdel(rt.keys.org(org).idem, call_state_key(org, "late"))
    (drift,) = (await check(rt, [org])).drifted
    assert any("late" in problem for problem in drift.problems), drift.problems
    assert (await repair(rt, [org])).repaired == [org]
    assert (await commit_call(rt, org, "late", 45)).outcome == Outcome.replayed
    assert await assert_books_agree(rt, org) == 955


async def test_balance_alerts_after_a_rebuild_are_not_dropped_as_duplicates(rt: Runtime) -> None:
    """seq starts again at 1 in a rebuilt org: the same crossing again must be a new alert."""
    org = await new_org(rt, 100, low_balance_threshold_pence=50)
    assert (await deduct_asset(rt, org, "a1", 60)).outcome == Outcome.ok  # 40 < 50: low_balance
    await drain_org_fully(rt, org)
    await flush_redis(rt)
    await ensure_rebuilt(rt)
    await credit(rt, org, "t1", 60)  # 100 again: re-armed
    assert (await deduct_asset(rt, org, "a2", 60)).outcome == Outcome.ok  # crossed again
    await drain_org_fully(rt, org)
    rows = await rt.pg.fetch("SELECT kind FROM alert_events WHERE org_id = $1 AND kind = 'low_balance'", org)
    assert len(rows) == 2
