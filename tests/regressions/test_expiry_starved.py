"""Found by an adversarial review: expiry skips a stale row (live in Postgres, unknown to Redis) while its org's
outbox holds anything, and its candidates are the 500 earliest rows: an org whose outbox is never
empty when the cron looks keeps its stale rows 'live' for good, and 500 of them at the head of the
queue stop every other org's holds from expiring (their credit stays held, their lines taken)."""

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.expiry import expire_batch_size_max, expire_due_holds
from credit_engine.engine.holds import reserve_call
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org


async def test_stale_rows_of_a_busy_org_starve_every_other_orgs_expiry(rt: Runtime, clock: ManualClock) -> None:
    busy = await new_org(rt, 10_000_000)
    for i in range(expire_batch_size_max):
        assert (await reserve_call(rt, busy, f"lost-{i}")).outcome == Outcome.ok
    await drain_org_fully(rt, busy)
    # Redis loses these holds (an `appendfsync everysec` crash after the worker drained them).
    await rt.redis.delete(rt.keys.org(busy).holds)
    # The busy org keeps working: its outbox has entries whenever the cron looks.
    assert (await reserve_call(rt, busy, "ongoing")).outcome == Outcome.ok

    clock.advance(13 * 3_600_000)  # the other org's call comes later (so its hold expires later)
    other = await new_org(rt, 10_000)
    assert (await reserve_call(rt, other, "silent")).outcome == Outcome.ok  # a call that never reports
    await drain_org_fully(rt, other)

    clock.advance(2 * 86_400_000)  # long past every hold's expiry
    reports = [await expire_due_holds(rt) for _ in range(3)]  # three cron runs
    held = await rt.redis.hget(rt.keys.org(other).org, "held_pence")
    live_rows = await rt.pg.fetchval("SELECT count(*) FROM call_holds WHERE org_id = $1 AND status = 'live'", busy)
    assert held == "0", "the other org's silent call never expires: its credit stays held"
    assert sum(report.missing_in_redis for report in reports) == expire_batch_size_max, reports
    assert live_rows == 0, "the busy org's stale rows stay 'live' for good"
