"""Found by an adversarial review: the reserve API fails open when Postgres is slow, and the phantom hold it
takes for a call resolved long ago is never expired (expiry reads its candidates from Postgres,
whose row stays 'committed'); it burns in the kill switch's prediction from its reservation on, so
after a while every call of the org is ended at once."""

from typing import Any

import asyncpg
import pytest

from credit_engine.engine.expiry import expire_due_holds
from credit_engine.engine.holds import release_call
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import check
from tests.webapp import vapi_payloads as payloads
from tests.webapp.test_kill_switch import END, World
from tests.webapp.test_seed_scenarios import wallet


async def test_a_reserve_retried_after_the_window_while_postgres_is_slow_leaves_a_hold_nothing_expires(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    org_id, key, number = await world.org(1_000)
    assert (await world.api.as_org(key, "POST", "/api/calls/api-done/reserve")).status_code == 201
    await world.api.vapi(payloads.end_of_call_report(payloads.call("api-done"), 30))
    await drain_org_fully(world.rt, org_id)
    world.clock.advance(world.rt.settings.idempotency_ttl_ms + 86_400_000)
    await release_call(world.rt, org_id, "pruner")  # any resolution prunes the org's expired records

    real_fetchval = asyncpg.Pool.fetchval

    async def slow(pool: asyncpg.Pool, query: str, *args: Any, **kwargs: Any) -> Any:
        if "call_holds" in query:
            raise TimeoutError  # as asyncpg does past engine.db.lookup_timeout_s (2 s)
        return await real_fetchval(pool, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "fetchval", slow)
    retried = await world.api.as_org(key, "POST", "/api/calls/api-done/reserve")  # the platform's retry queue
    monkeypatch.undo()
    await drain_org_fully(world.rt, org_id)
    row = await world.rt.pg.fetchrow(
        "SELECT status FROM call_holds WHERE org_id = $1 AND call_id = 'api-done'",
        org_id,
    )

    # A day later: the hold's own expiry is long past, yet nothing expires it.
    world.clock.advance(86_400_000)
    report = await expire_due_holds(world.rt)
    held = await wallet(world.api, key)
    drift = await check(world.rt, [org_id])

    # The org's next real call: admitted (its credit funds it), then ended at the next round.
    real = await world.start_call(number, "real")
    await world.round()

    assert retried.status_code == 503, (
        "a reserve for a call Postgres cannot vouch for takes no hold: refused, the platform retries"
    )
    assert (held["live_calls"], held["held_pence"]) == (0, 0), "a phantom hold locks credit and a line for good"
    assert world.fake.control_bodies("real") != [END], "a funded call is ended at once by the phantom's burn"
    del real
    assert row is not None and row["status"] == "committed", "the finished call stays finished"
    assert report.expired == 0, "no phantom hold was taken, so none is left to expire"
    assert drift.clean, drift.drifted
