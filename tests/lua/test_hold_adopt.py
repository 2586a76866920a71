"""lua/hold_adopt.lua: a placed call's hold moves from its reservation id to Vapi's call id, once,
with nothing about money changing (engine/dial.adopt_call), on a real Redis and on fakeredis."""

from credit_engine.engine.dial import adopt_call
from credit_engine.engine.holds import commit_call, live_holds, reserve_call
from credit_engine.engine.idempotency import dial_reservation_id
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.lua.conftest import outbox, seed_org


async def test_adopting_moves_the_hold_as_it_stands_and_a_second_adoption_is_a_replay(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000, hold_block_minutes=5)
    reservation_id = dial_reservation_id(org, "k")
    reserved = await reserve_call(redis_rt, org, reservation_id)
    before = await outbox(redis_rt, org)
    adopted = await adopt_call(redis_rt, org, reservation_id, "vapi-call-1")
    assert adopted.outcome == Outcome.ok
    assert (adopted.hold_pence, adopted.max_duration_s) == (reserved.hold_pence, reserved.max_duration_s)
    assert (adopted.money.balance_pence, adopted.money.held_pence) == (1000, 300)  # no money moved
    assert list(await live_holds(redis_rt, org)) == ["vapi-call-1"]
    events = [(e["c"], e["st"]) for e in (await outbox(redis_rt, org))[len(before) :]]
    assert events == [(reservation_id, "released"), ("vapi-call-1", "live")]
    again = await adopt_call(redis_rt, org, reservation_id, "vapi-call-1")
    assert (again.outcome, again.hold_pence) == (Outcome.replayed, 300)
    assert len(await outbox(redis_rt, org)) == len(before) + 2
    # The reservation id cannot be held again, nor adopted by another call.
    assert (await reserve_call(redis_rt, org, reservation_id)).outcome == Outcome.call_already_resolved
    assert (await adopt_call(redis_rt, org, reservation_id, "vapi-call-2")).outcome == Outcome.idempotency_conflict
    committed = await commit_call(redis_rt, org, "vapi-call-1", 30)
    assert (committed.outcome, committed.charged_pence, committed.money.held_pence) == (Outcome.ok, 30, 0)


async def test_no_reservation_is_hold_not_found_and_moves_nothing(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    adopted = await adopt_call(redis_rt, org, dial_reservation_id(org, "never"), "vapi-call-1")
    assert (adopted.outcome, adopted.hold_pence) == (Outcome.hold_not_found, 0)
    assert await live_holds(redis_rt, org) == {}
    assert await outbox(redis_rt, org) == []


async def test_a_call_that_holds_its_own_is_a_conflict_and_nothing_moves(redis_rt: Runtime) -> None:
    org = await seed_org(redis_rt, 1000)
    reservation_id = dial_reservation_id(org, "k")
    await reserve_call(redis_rt, org, "vapi-call-1")
    await reserve_call(redis_rt, org, reservation_id)
    adopted = await adopt_call(redis_rt, org, reservation_id, "vapi-call-1")
    assert adopted.outcome == Outcome.idempotency_conflict
    assert set(await live_holds(redis_rt, org)) == {"vapi-call-1", reservation_id}


async def test_an_unknown_org_is_org_unknown(redis_rt: Runtime) -> None:
    adopted = await adopt_call(redis_rt, "nobody", dial_reservation_id("nobody", "k"), "vapi-call-1")
    assert adopted.outcome == Outcome.org_unknown
