"""engine/burn.py is the Python model of lua/_burn.lua's burn sums and depletion moment. On traffic
drawn at random (reservations, starts, ends, commits, releases, at random moments, several rates),
after every decision: the org hash's sums are what the model recomputes from the holds, and every
depletion moment a script reports is the one the model predicts from the hash."""

import random
from typing import Any

import pytest

from credit_engine.engine import burn, decisions, holds
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.holds import CallEvent, check_call, commit_call, release_call, reserve_call
from credit_engine.engine.records import HoldRecord
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.lua.conftest import seed_org

STEPS = 40


async def sums_and_holds(rt: Runtime, org_id: str) -> tuple[burn.Burn, list[HoldRecord]]:
    keys = rt.keys.org(org_id)
    fields = await rt.redis.hmget(keys.org, list(burn.FIELDS))
    raw = await rt.redis.hgetall(keys.holds)
    return burn.Burn.from_fields(fields), [HoldRecord.decode(text) for text in raw.values()]


class Calls:
    """The org's calls so far, and one random decision about them at a time."""

    def __init__(self) -> None:
        self.live: list[str] = []  # reserved, not resolved
        self.started: set[str] = set()
        self.ended: set[str] = set()

    async def move(self, rt: Runtime, org_id: str, draw: random.Random, new_call: str) -> str:
        move = draw.choice(["reserve", "start", "end", "commit", "release"]) if self.live else "reserve"
        call = draw.choice(self.live) if self.live else new_call
        if move == "reserve":
            if (await reserve_call(rt, org_id, new_call)).outcome == Outcome.ok:
                self.live.append(new_call)
        elif move == "start" and call not in self.started:
            await check_call(rt, org_id, call, CallEvent.start)
            self.started.add(call)
        elif move == "end" and call in self.started and call not in self.ended:
            await check_call(rt, org_id, call, CallEvent.end)
            self.ended.add(call)
        elif move == "commit":
            await commit_call(rt, org_id, call, draw.randrange(0, 600))
            self.live.remove(call)
        elif move == "release":
            await release_call(rt, org_id, call)
            self.live.remove(call)
        return move


@pytest.mark.parametrize("seed", range(6))
async def test_the_scripts_burn_sums_and_depletion_are_the_models(
    redis_rt: Runtime, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, draw = redis_rt, random.Random(seed)
    assert isinstance(rt.clock, ManualClock)
    reported: list[int] = []

    async def file(_rt: Runtime, _org: str, depletion_ms: int) -> None:
        reported.append(depletion_ms)

    def add(_pipe: Any, _rt: Runtime, _org: str, depletion_ms: int) -> None:
        reported.append(depletion_ms)

    monkeypatch.setattr(decisions, "file_depletion", file)  # what the scripts report, as it is filed
    monkeypatch.setattr(holds, "add_depletion", add)
    org_id = await seed_org(rt, draw.randrange(500, 50_000), rate_pence_per_minute=draw.choice([7, 60, 113]))
    calls = Calls()
    compared = 0
    for step in range(STEPS):
        rt.clock.advance(draw.randrange(0, 90_000))
        reported.clear()
        move = await calls.move(rt, org_id, draw, f"call-{seed}-{step}")
        sums, held = await sums_and_holds(rt, org_id)
        assert (sums.rate, sums.k, sums.frozen_pence) == burn.burn_sums(held, sums.at_s), (seed, step, move)
        for depletion_ms in (d for d in reported if d > 0):
            assert depletion_ms == sums.depletion_ms(), (seed, step, move)
            compared += 1
    assert compared > 0  # the scripts did report moments, and each was compared
