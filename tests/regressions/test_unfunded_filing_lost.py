"""Found by an adversarial review (low): a visit's reschedule writes the org's next visit with a plain ZADD, then
re-reads the burn sums to refile a depletion moment filed meanwhile. An unfunded hold taken in that
window filed "now" (hold_reserve.lua's reply), which the plain ZADD overwrites and which the burn
sums do not show: the call that must be ended at once waits for the org's next visit (up to
CREDIT_ENGINE_KILL_RECHECK_S, 30 s, later)."""

from typing import Any

import pytest

from credit_engine.engine import killswitch
from credit_engine.engine.holds import CallEvent, Unfunded, check_call, reserve_call
from credit_engine.engine.results import Outcome
from tests.webapp.test_kill_switch import END, World


async def test_an_unfunded_hold_taken_during_a_visit_is_not_ended_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    org_id, _key, number = await world.org(100_000)  # a rich org with a call running
    await world.start_call(number, "funded")
    world.at(1)
    await world.rt.redis.zadd(world.rt.keys.kill_schedule(org_id), {org_id: world.clock.value_ms})  # e.g. the backstop
    await world.round()  # visited: next visit in kill_recheck_ms (30 s), the org's calls being far from depletion
    real = killswitch.reschedule
    taken = False

    async def reschedule_racing_a_first_sight(rt: Any, org: str, visit: Any) -> None:
        nonlocal taken
        if org == org_id and not taken:  # between the tick and the reschedule's ZADD
            taken = True
            reservation = await reserve_call(rt, org_id, "suspended-number-call", Unfunded.always)
            assert reservation.outcome == Outcome.admitted_unfunded
            await check_call(rt, org_id, "suspended-number-call", CallEvent.start)
            await rt.redis.hset(
                rt.keys.org(org_id).control,
                "suspended-number-call",
                "https://aws-us-west-2-production1-phone-call-websocket.vapi.ai/suspended-number-call/control",
            )
        await real(rt, org, visit)

    monkeypatch.setattr(killswitch, "reschedule", reschedule_racing_a_first_sight)
    world.at(40)
    await world.round()
    assert taken
    scheduled = await world.scheduled_ms(org_id)
    assert scheduled is not None, "the unfunded call's org is filed nowhere: the kill switch never visits it again"
    world.at(41)
    await world.round()
    assert world.fake.control_bodies("suspended-number-call") == [END], "an unfunded call waits for the next visit"
