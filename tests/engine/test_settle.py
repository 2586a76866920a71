"""Silent holds settled from Vapi's own record (engine/settle.py), against real Redis and Postgres
and the fake Vapi API over real HTTP."""

import asyncio
from datetime import timedelta

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.expiry import expire_due_holds
from credit_engine.engine.holds import CallEvent, check_call, commit_call, live_holds, reserve_call
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.settle import settle_silent_holds
from credit_engine.engine.vapi_account import VapiAccount
from credit_engine.engine.vapi_calls import VapiPace
from credit_engine.webapp.vapi_messages import billed_seconds
from tests.fake_vapi_api import API_KEY, T0, FakeVapiApi, iso
from tests.helpers import assert_books_agree, new_org

GRACE_MS = 60_000


def _account(rt: Runtime, fake: FakeVapiApi, rps: int = 50) -> VapiAccount:
    pace = VapiPace(rt.redis, rt.keys, rps)
    return VapiAccount(API_KEY, fake.base_url, backoff_s=0.01, pace=pace.wait_turn)


async def _running_call(rt: Runtime, org_id: str, call_id: str) -> int:
    """A call admitted and started; its hold in Postgres too. Returns its funded seconds."""
    reservation = await reserve_call(rt, org_id, call_id)
    assert reservation.outcome == Outcome.ok
    await check_call(rt, org_id, call_id, CallEvent.start)
    await drain_org_fully(rt, org_id)
    return reservation.max_duration_s


async def _call_entries(rt: Runtime, org_id: str) -> list[dict[str, object]]:
    rows = await rt.pg.fetch(
        "SELECT idempotency_key, kind, amount_pence, billed_seconds FROM ledger_entries "
        "WHERE org_id = $1 AND call_id IS NOT NULL ORDER BY id",
        org_id,
    )
    return [dict(row) for row in rows]


async def test_a_call_whose_report_was_dropped_is_billed_at_vapis_duration_and_a_late_report_is_a_replay(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    org_id = await new_org(rt, 10_000, rate_pence_per_minute=60)  # 1p a second
    funded_s = await _running_call(rt, org_id, "call-dropped")
    started = T0 + timedelta(seconds=3)
    ended = started + timedelta(seconds=95, milliseconds=200)  # 95.2 s: 96 started seconds
    vapi_api.add_call("call-dropped", status="ended", started_at=started, ended_at=ended, cost=0.31)

    clock.advance(funded_s * 1000 - 1)  # not due yet: nothing is looked up
    async with _account(rt, vapi_api) as account:
        report = await settle_silent_holds(rt, account, 10)
        assert (report.candidates, report.looked_up) == (0, 0)
        clock.advance(GRACE_MS + 1)
        report = await settle_silent_holds(rt, account, 10)
    assert (report.looked_up, report.committed, report.charged_pence) == (1, 1, 96), report
    assert vapi_api.invalid == []

    await drain_org_fully(rt, org_id)
    assert await _call_entries(rt, org_id) == [
        {
            "idempotency_key": f"{org_id}/call/call-dropped/charge",
            "kind": "call_charge",
            "amount_pence": -96,
            "billed_seconds": 96,
        }
    ]
    assert await assert_books_agree(rt, org_id) == 10_000 - 96
    row = await rt.pg.fetchrow("SELECT status, billed_seconds FROM call_holds WHERE call_id = 'call-dropped'")
    assert (row["status"], row["billed_seconds"]) == ("committed", 96)

    # The real report turns up after all: the same times give the same seconds, a replay.
    report_message = {"type": "end-of-call-report", "startedAt": iso(started), "endedAt": iso(ended)}
    late = billed_seconds(report_message, {})
    assert late == 96
    resolution = await commit_call(rt, org_id, "call-dropped", late)
    assert resolution.outcome == Outcome.replayed
    await drain_org_fully(rt, org_id)
    assert len(await _call_entries(rt, org_id)) == 1
    assert await assert_books_agree(rt, org_id) == 10_000 - 96


async def test_a_call_still_running_at_vapi_keeps_its_hold_and_is_not_asked_again_at_once(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    org_id = await new_org(rt, 10_000)
    funded_s = await _running_call(rt, org_id, "call-long")
    vapi_api.add_call("call-long", "https://x.vapi.ai/call-long/control", status="in-progress", started_at=T0)
    clock.advance(funded_s * 1000 + GRACE_MS + 1)
    async with _account(rt, vapi_api) as account:
        report = await settle_silent_holds(rt, account, 10)
        assert (report.looked_up, report.in_progress, report.committed) == (1, 1, 0)
        again = await settle_silent_holds(rt, account, 10)
        assert (again.looked_up, again.recently_looked_up) == (0, 1)
    assert "call-long" in await live_holds(rt, org_id)  # and with it the kill switch's hold on the call
    assert await _call_entries(rt, org_id) == []


async def test_vapi_not_knowing_the_call_or_failing_changes_nothing_and_the_hold_expires_as_before(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    org_id = await new_org(rt, 10_000)
    funded_s = await _running_call(rt, org_id, "call-404")
    await _running_call(rt, org_id, "call-500")
    vapi_api.add_call("call-500", status="ended", started_at=T0, ended_at=T0 + timedelta(seconds=30))
    vapi_api.failing["GET /call/call-500"] = 500
    clock.advance(funded_s * 1000 + GRACE_MS + 1)
    async with _account(rt, vapi_api) as account:
        report = await settle_silent_holds(rt, account, 10)
    assert (report.looked_up, report.not_found, report.errors, report.committed) == (2, 1, 1, 0), report
    assert len(vapi_api.seen_where("GET", "/call/call-500")) == 3  # retried, then given up
    assert set(await live_holds(rt, org_id)) == {"call-404", "call-500"}
    await drain_org_fully(rt, org_id)
    assert await _call_entries(rt, org_id) == []
    assert await assert_books_agree(rt, org_id) == 10_000

    clock.advance(rt.settings.hold_report_slack_ms)  # past the expiry: expired exactly as before
    expired = await expire_due_holds(rt)
    assert expired.expired == 2
    await drain_org_fully(rt, org_id)
    assert {e["kind"] for e in await _call_entries(rt, org_id)} <= {"call_expired"}
    await assert_books_agree(rt, org_id)


async def test_lookups_keep_to_the_rate_across_workers(rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi) -> None:
    """Two settle runs at once (two workers), each with its own client: together at most `rps`
    requests in any second, each call looked up once."""
    rps = 3
    org_id = await new_org(rt, 100_000)
    funded = [await _running_call(rt, org_id, f"call-{i}") for i in range(9)]
    for i in range(9):
        vapi_api.add_call(f"call-{i}", "https://x.vapi.ai/c/control", status="in-progress", started_at=T0)
    clock.advance(max(funded) * 1000 + GRACE_MS + 1)
    async with _account(rt, vapi_api, rps) as first, _account(rt, vapi_api, rps) as second:
        reports = await asyncio.gather(settle_silent_holds(rt, first, 9), settle_silent_holds(rt, second, 9))
    assert sum(r.looked_up for r in reports) == 9
    arrivals = sorted(seen.at for seen in vapi_api.seen_where("GET", "/call/"))
    assert len(arrivals) == 9
    # Any rps + 1 requests in a row span a second (less a little for the HTTP's own jitter).
    assert all(later - earlier >= 0.95 for earlier, later in zip(arrivals, arrivals[rps:], strict=False)), arrivals


async def test_the_worker_job_counts_its_lookups_and_does_nothing_without_a_vapi_key(
    rt: Runtime, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    from credit_engine.worker import jobs
    from credit_engine.worker.metrics import METRICS

    def counted(event: str) -> float:
        return METRICS.registry.get_sample_value("credit_engine_worker_events_total", {"event": event}) or 0.0

    org_id = await new_org(rt, 10_000)
    funded_s = await _running_call(rt, org_id, "call-job")
    vapi_api.add_call("call-job", status="ended", started_at=T0, ended_at=T0 + timedelta(seconds=20))
    clock.advance(funded_s * 1000 + GRACE_MS + 1)
    assert await jobs.settle_holds({"rt": rt, "vapi": None}) == {}  # no VAPI_API_KEY: as before
    assert "call-job" in await live_holds(rt, org_id)
    before = counted("settle_committed"), counted("settle_looked_up")
    async with _account(rt, vapi_api) as account:
        result = await jobs.settle_holds({"rt": rt, "vapi": account})
    assert (result["looked_up"], result["committed"], result["charged_pence"]) == (1, 1, 20)
    assert (counted("settle_committed"), counted("settle_looked_up")) == (before[0] + 1, before[1] + 1)
    assert await rt.redis.hget(rt.keys.worker_counters, "settle_committed") in ("1", b"1")
