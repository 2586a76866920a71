"""The money scripts at their boundaries, on a real Redis and on fakeredis."""

from dataclasses import replace

import pytest
from redis.exceptions import ResponseError

from credit_engine.engine import limits
from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.holds import CallEvent, check_call, commit_call, expire_call, release_call, reserve_call
from credit_engine.engine.idempotency import client_ledger_key, credit_ledger_key, repay_ledger_key
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.lua.conftest import outbox, seed_org


async def test_deduct_exactly_the_available_balance_then_one_penny_more_is_refused(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    ok = await deduct_asset(redis_rt, org, "a", 1000)
    assert ok.outcome == Outcome.ok
    assert ok.money.balance_pence == 0
    refused = await deduct_asset(redis_rt, org, "b", 1)
    assert refused.outcome == Outcome.insufficient_funds
    assert refused.money.balance_pence == 0
    entries = await outbox(redis_rt, org)
    assert [(e["kind"], e["a"], e["b"]) for e in entries] == [("asset", "-1000", "0")]


async def test_deduct_one_penny_over_available_is_refused_and_writes_nothing(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    refused = await deduct_asset(redis_rt, org, "a", 1001)
    assert refused.outcome == Outcome.insufficient_funds
    assert refused.money.balance_pence == 1000
    assert await outbox(redis_rt, org) == []
    # A refusal records nothing: the same key succeeds once the amount fits.
    assert (await deduct_asset(redis_rt, org, "a", 999)).outcome == Outcome.ok


async def test_holds_count_against_available_for_asset_deductions(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000, hold_block_minutes=5)  # 60p/min: a 300p hold
    assert (await reserve_call(redis_rt, org, "call-1")).hold_pence == 300
    assert (await deduct_asset(redis_rt, org, "a", 701)).outcome == Outcome.insufficient_funds
    assert (await deduct_asset(redis_rt, org, "b", 700)).outcome == Outcome.ok


async def test_replay_returns_the_first_outcome_and_other_payload_is_a_conflict(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    first = await deduct_asset(redis_rt, org, "k", 400, fingerprint="area=415")
    await deduct_asset(redis_rt, org, "other", 100)
    replay = await deduct_asset(redis_rt, org, "k", 400, fingerprint="area=415")
    assert replay.outcome == Outcome.replayed
    assert replay.balance_pence_after == first.balance_pence_after == 600
    assert replay.money.balance_pence == 500  # current balance: nothing taken twice
    assert (await deduct_asset(redis_rt, org, "k", 401, fingerprint="area=415")).outcome == Outcome.idempotency_conflict
    assert (await deduct_asset(redis_rt, org, "k", 400, fingerprint="area=212")).outcome == Outcome.idempotency_conflict
    assert len(await outbox(redis_rt, org)) == 2


@pytest.mark.parametrize("amount", [0, -1, limits.amount_pence_max + 1, 2**53, 1.5, True, "100"])
async def test_amounts_outside_one_to_the_maximum_are_refused_before_redis(redis_rt: Runtime, amount: object) -> None:
    org = await seed_org(redis_rt, 1000)
    with pytest.raises(InvalidInput) as error:
        await deduct_asset(redis_rt, org, "k", amount)  # type: ignore[arg-type]
    assert error.value.field == "amount_pence"


@pytest.mark.parametrize("amount", ["0", "-5", "1.5", str(10**12 + 1), "abc"])
async def test_the_script_itself_refuses_a_bad_amount_and_writes_nothing(redis_rt: Runtime, amount: str) -> None:
    org = await seed_org(redis_rt, 1000)
    keys = redis_rt.keys.org(org)
    with pytest.raises(ResponseError, match="bad argument amount_pence"):
        await redis_rt.scripts.run(
            redis_rt.redis,
            "asset_deduct",
            [keys.org, keys.idem, keys.idem_exp, keys.outbox],
            [0, org, client_ledger_key(org, "asset", "x"), amount, "", 1000, 10, "{}"],
        )
    assert await redis_rt.redis.hget(keys.org, "balance_pence") == "1000"
    assert await outbox(redis_rt, org) == []


async def test_largest_amount_is_exact(redis_rt: Runtime) -> None:
    big = limits.amount_pence_max
    org = await seed_org(redis_rt, big)
    result = await deduct_asset(redis_rt, org, "k", big - 1)
    assert result.outcome == Outcome.ok
    assert result.money.balance_pence == 1
    assert (await outbox(redis_rt, org))[0]["a"] == str(-(big - 1))


async def test_unknown_org_is_refused(redis_rt: Runtime) -> None:
    assert (await deduct_asset(redis_rt, "nobody", "k", 1)).outcome == Outcome.org_unknown
    assert (await reserve_call(redis_rt, "nobody", "c1")).outcome == Outcome.org_unknown
    assert (await commit_call(redis_rt, "nobody", "c1", 10)).outcome == Outcome.org_unknown


async def test_outbox_full_refuses_new_decisions_but_not_commits(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 10_000)
    rt = redis_rt
    rt.settings = replace(rt.settings, outbox_per_org_max=2)
    assert (await deduct_asset(rt, org, "a", 1)).outcome == Outcome.ok
    assert (await reserve_call(rt, org, "call-1")).outcome == Outcome.ok  # outbox now holds 2
    full = await deduct_asset(rt, org, "b", 1)
    assert full.outcome == Outcome.outbox_full
    assert full.money.balance_pence == 9_999
    assert (await reserve_call(rt, org, "call-2")).outcome == Outcome.outbox_full
    # The call that already has a hold can still be committed: the charge is recorded.
    committed = await commit_call(rt, org, "call-1", 60)
    assert committed.outcome == Outcome.ok
    assert committed.charged_pence == 60
    assert len(await outbox(rt, org)) == 4  # the charge and the hold event, above the limit


async def test_reserve_caps_the_hold_at_available_and_answers_funded_seconds(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 250, rate_pence_per_minute=60, hold_block_minutes=5)
    reservation = await reserve_call(redis_rt, org, "call-1")
    assert reservation.outcome == Outcome.ok
    assert reservation.hold_pence == 250  # less than a 300p block: capped at what is available
    assert reservation.max_duration_s == 250  # 250p at 1p/s
    assert reservation.money.available_pence == 0


async def test_reserve_refuses_below_the_minimum_to_start(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 59, rate_pence_per_minute=60)  # default minimum: one minute, 60p
    assert (await reserve_call(redis_rt, org, "c")).outcome == Outcome.insufficient_funds
    org2 = await seed_org(redis_rt, 100, rate_pence_per_minute=60, min_start_pence=120)
    assert (await reserve_call(redis_rt, org2, "c")).outcome == Outcome.insufficient_funds
    org3 = await seed_org(redis_rt, 60, rate_pence_per_minute=60)
    assert (await reserve_call(redis_rt, org3, "c")).outcome == Outcome.ok


async def test_max_duration_is_capped_at_vapis_limit(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 10**9, rate_pence_per_minute=1)
    reservation = await reserve_call(redis_rt, org, "c")
    assert reservation.max_duration_s == limits.max_duration_s_max


async def test_a_second_reserve_of_the_same_call_returns_the_first_hold(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    first = await reserve_call(redis_rt, org, "call-1")
    second = await reserve_call(redis_rt, org, "call-1")
    assert second.outcome == Outcome.replayed
    assert (second.hold_pence, second.max_duration_s) == (first.hold_pence, first.max_duration_s)
    assert second.money.held_pence == first.hold_pence


async def test_too_many_concurrent_calls_is_refused(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 10_000, max_concurrent_calls=2)
    assert (await reserve_call(redis_rt, org, "c1")).outcome == Outcome.ok
    assert (await reserve_call(redis_rt, org, "c2")).outcome == Outcome.ok
    assert (await reserve_call(redis_rt, org, "c3")).outcome == Outcome.too_many_calls
    await commit_call(redis_rt, org, "c1", 1)
    assert (await reserve_call(redis_rt, org, "c3")).outcome == Outcome.ok


async def test_a_call_is_billed_per_second_rounded_up_to_a_penny(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000, rate_pence_per_minute=7)
    await reserve_call(redis_rt, org, "c")
    result = await commit_call(redis_rt, org, "c", 61)  # 61 s at 7p/min = 7.1166p -> 8p
    assert result.charged_pence == 8
    assert result.money.balance_pence == 992
    assert result.money.held_pence == 0
    result0 = await commit_call(redis_rt, org, "zero", 0)  # direct billing of a 0 s call
    assert result0.charged_pence == 0


async def test_check_extends_block_by_block_then_ends_the_call(redis_rt: Runtime) -> None:
    clock = redis_rt.clock
    org = await seed_org(redis_rt, 700, rate_pence_per_minute=60, hold_block_minutes=5)
    assert (await reserve_call(redis_rt, org, "c")).hold_pence == 300
    started = await check_call(redis_rt, org, "c", CallEvent.start)
    assert started.started and not started.end_call
    clock.advance(4 * 60_000 + 1)  # less than a minute of the hold left: extend by a block
    extended = await check_call(redis_rt, org, "c")
    assert extended.hold_pence == 600
    assert extended.money.held_pence == 600
    assert not extended.end_call
    clock.advance(5 * 60_000)  # 9 min: extend by what is left (100p)
    last = await check_call(redis_rt, org, "c")
    assert last.hold_pence == 700
    assert not last.end_call
    clock.advance(3 * 60_000)  # 12 min: more than the 700p funds (11m40s)
    ended = await check_call(redis_rt, org, "c")
    assert ended.end_call
    assert ended.remaining_ms <= 0
    assert ended.cost_so_far_pence >= 700


async def test_check_does_not_end_a_call_that_has_not_started(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 100)
    await reserve_call(redis_rt, org, "c")
    redis_rt.clock.advance(3_600_000)
    result = await check_call(redis_rt, org, "c")
    assert not result.started and not result.end_call and result.cost_so_far_pence == 0


async def test_check_of_an_unknown_call(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 100)
    assert (await check_call(redis_rt, org, "nope")).outcome == Outcome.hold_not_found


async def test_commit_releases_the_unused_hold(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    await reserve_call(redis_rt, org, "c")
    result = await commit_call(redis_rt, org, "c", 90)
    assert (result.outcome, result.charged_pence, result.hold_pence) == (Outcome.ok, 90, 300)
    assert (result.money.balance_pence, result.money.held_pence, result.money.available_pence) == (910, 0, 910)


async def test_commit_without_a_hold_bills_directly(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    result = await commit_call(redis_rt, org, "outbound", 120)
    assert (result.outcome, result.charged_pence, result.hold_pence) == (Outcome.ok, 120, 0)
    assert result.money.balance_pence == 880


async def test_a_duplicate_commit_is_a_no_op(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    await reserve_call(redis_rt, org, "c")
    await commit_call(redis_rt, org, "c", 90)
    again = await commit_call(redis_rt, org, "c", 90)
    assert again.outcome == Outcome.replayed
    assert again.charged_pence == 90
    assert again.money.balance_pence == 910
    different = await commit_call(redis_rt, org, "c", 95)
    assert different.outcome == Outcome.idempotency_conflict
    assert different.money.balance_pence == 910
    kinds = [e["kind"] for e in await outbox(redis_rt, org) if e["t"] == "L"]
    assert kinds == ["call_charge"]


async def test_overrun_is_charged_in_full_down_to_the_overdraft_then_as_debt(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 100, overdraft_pence=50)
    result = await commit_call(redis_rt, org, "c", 300)  # 300p cost against 100p
    assert result.charged_pence == 300
    assert result.money.balance_pence == -50  # the overdraft floor
    assert result.money.debt_pence == 150  # the rest, recorded, not dropped
    assert result.debt_delta_pence == 150
    entry = [e for e in await outbox(redis_rt, org) if e["t"] == "L"][0]
    assert (entry["a"], entry["dd"]) == ("-150", "150")


async def test_default_overdraft_zero_records_the_whole_shortfall_as_debt(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 0)
    result = await commit_call(redis_rt, org, "c", 60)
    assert (result.money.balance_pence, result.money.debt_pence) == (0, 60)
    # The next charge cannot take the balance lower either.
    assert (await commit_call(redis_rt, org, "d", 60)).money.debt_pence == 120


async def test_a_hold_resolves_once_expire_then_late_commit_settles_the_difference(redis_rt: Runtime) -> None:
    clock = redis_rt.clock
    org = await seed_org(redis_rt, 10_000)
    reservation = await reserve_call(redis_rt, org, "c")
    await check_call(redis_rt, org, "c", CallEvent.start)
    clock.advance(30_000)
    await check_call(redis_rt, org, "c")  # last seen 30 s in
    assert (await expire_call(redis_rt, org, "c")).outcome == Outcome.not_expired
    clock.advance(reservation.max_duration_s * 1000 + redis_rt.settings.hold_report_slack_ms)
    expired = await expire_call(redis_rt, org, "c")
    assert (expired.outcome, expired.charged_pence) == (Outcome.ok, 30)  # up to the last known moment
    assert (await expire_call(redis_rt, org, "c")).outcome == Outcome.replayed
    late = await commit_call(redis_rt, org, "c", 95)  # the report arrives: 95 s really
    assert (late.outcome, late.charged_pence) == (Outcome.adjusted, 65)
    assert late.money.balance_pence == 10_000 - 95
    assert (await commit_call(redis_rt, org, "c", 95)).outcome == Outcome.replayed
    assert (await expire_call(redis_rt, org, "c")).outcome == Outcome.replayed
    assert late.money.held_pence == 0


async def test_a_late_report_shorter_than_what_expiry_charged_is_refunded(redis_rt: Runtime) -> None:
    clock = redis_rt.clock
    org = await seed_org(redis_rt, 1_000)
    await reserve_call(redis_rt, org, "c")
    await check_call(redis_rt, org, "c", CallEvent.start)
    clock.advance(60_000)
    await check_call(redis_rt, org, "c")
    await release_call(redis_rt, org, "c")  # charges 60 s
    late = await commit_call(redis_rt, org, "c", 20)
    assert (late.outcome, late.charged_pence) == (Outcome.adjusted, -40)
    assert late.money.balance_pence == 980


async def test_commit_after_commit_never_adjusts(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1_000)
    await commit_call(redis_rt, org, "c", 10)
    assert (await release_call(redis_rt, org, "c")).outcome == Outcome.replayed
    assert (await reserve_call(redis_rt, org, "c")).outcome == Outcome.call_already_resolved


async def test_credit_pays_debt_first(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 0, debt_pence=70)
    keys = redis_rt.keys.org(org)
    key = credit_ledger_key(org, "topup", "t1")
    reply = await redis_rt.scripts.run(
        redis_rt.redis,
        "credit_apply",
        [keys.org, keys.idem, keys.idem_exp, keys.outbox],
        [0, org, key, 100, repay_ledger_key(org, key), 10**9],
    )
    assert reply[:6] == [0, 30, 0, 30, 0, 1 + 1]  # balance 30, debt 0, seq bumped once
    assert reply[6] == 0  # no call is burning: no depletion moment
    assert reply[7] == 70
    entry = (await outbox(redis_rt, org))[0]
    assert (entry["kind"], entry["a"], entry["dd"]) == ("debt_repayment", "-70", "-70")
    replay = await redis_rt.scripts.run(
        redis_rt.redis,
        "credit_apply",
        [keys.org, keys.idem, keys.idem_exp, keys.outbox],
        [0, org, key, 100, repay_ledger_key(org, key), 10**9],
    )
    assert replay[0] == Outcome.replayed
    assert replay[1] == 30


async def test_idempotency_records_expire_after_their_ttl(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    await deduct_asset(redis_rt, org, "k", 100)
    redis_rt.clock.advance(redis_rt.settings.idempotency_ttl_ms + 1)
    # Past the window the key is new again (Postgres keeps it forever: see the ledger tests).
    assert (await deduct_asset(redis_rt, org, "other", 1)).outcome == Outcome.ok  # prunes as it passes
    assert not await redis_rt.redis.hexists(redis_rt.keys.org(org).idem, client_ledger_key(org, "asset", "k"))


async def test_call_cost_rounding_matches_python_for_every_second_and_awkward_rates(redis_rt: Runtime) -> None:
    """Lua and Python (engine/amounts.py) round the same way, including every remainder mod 60."""
    from credit_engine.engine.amounts import call_cost_pence

    for rate in (1, 7, 59, 61):
        org = await seed_org(redis_rt, 10**9, rate_pence_per_minute=rate)
        for billed in range(0, 121):
            result = await commit_call(redis_rt, org, f"c{billed}", billed)  # direct billing
            assert result.charged_pence == call_cost_pence(billed, rate), (rate, billed)


async def test_the_end_event_stops_the_clock_and_ends_the_call(redis_rt: Runtime) -> None:
    clock = redis_rt.clock
    org = await seed_org(redis_rt, 10_000)
    await reserve_call(redis_rt, org, "c")
    await check_call(redis_rt, org, "c", CallEvent.start)
    clock.advance(45_000)
    ended = await check_call(redis_rt, org, "c", CallEvent.end)
    assert (ended.ended, ended.end_call, ended.cost_so_far_pence) == (True, True, 45)
    clock.advance(600_000)
    later = await check_call(redis_rt, org, "c")
    assert later.cost_so_far_pence == 45  # stopped at the end, not still running
    assert (await check_call(redis_rt, org, "c", CallEvent.start)).cost_so_far_pence == 45  # no restart


async def test_a_hold_whose_report_never_comes_expires_soon_after_the_end_charging_up_to_it(redis_rt: Runtime) -> None:
    clock = redis_rt.clock
    org = await seed_org(redis_rt, 10_000)
    await reserve_call(redis_rt, org, "c")
    await check_call(redis_rt, org, "c", CallEvent.start)
    clock.advance(70_000)
    await check_call(redis_rt, org, "c", CallEvent.end)
    clock.advance(redis_rt.settings.hold_report_slack_ms - 1)
    assert (await expire_call(redis_rt, org, "c")).outcome == Outcome.not_expired
    clock.advance(1)
    expired = await expire_call(redis_rt, org, "c")
    assert (expired.outcome, expired.charged_pence) == (Outcome.ok, 70)
