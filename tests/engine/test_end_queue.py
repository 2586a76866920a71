"""The end queue: live calls no org's hold covers are ended through their control URL, over real
HTTP to a fake Vapi, with the kill switch's retries, give-up, alert and counters. Real Redis and
Postgres; time is a ManualClock (the backoff is checked to the millisecond without sleeping)."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.end_queue import end_unheld_call
from credit_engine.engine.idempotency import end_call_failed_alert_key
from credit_engine.engine.killswitch import KillSwitch, RoundReport, run_round
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.runtime import Runtime
from credit_engine.worker.background import TimedLoops
from tests.conftest import delete_prefix
from tests.fake_vapi import FakeVapi, fake_vapi_server
from tests.helpers import new_org

END = {"type": "end-call"}
QUEUE_SETTINGS = {
    "kill_attempts_max": 3,
    "kill_backoff_base_ms": 1_000,
    "kill_backoff_max_ms": 4_000,
    "vapi_control_token": "control-token-" + "e" * 24,
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeVapi]:
    async with fake_vapi_server() as server:
        yield server


@pytest.fixture
async def qrt(settings: Settings, clock: ManualClock, fake: FakeVapi) -> AsyncIterator[Runtime]:
    runtime = await Runtime.open(replace(settings, vapi_control_base_url=fake.base_url, **QUEUE_SETTINGS), clock=clock)
    yield runtime
    await runtime.close()
    assert settings.redis_url is not None
    await delete_prefix(settings.redis_url, settings.key_prefix)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def at(qrt: Runtime, clock: ManualClock, t0_ms: int, seconds: float, http: httpx.AsyncClient) -> RoundReport:
    """Move the clock to t0 + seconds and run one round (waiting for its pushes)."""
    clock.advance(t0_ms + int(seconds * 1000) - clock.value_ms)
    return await run_round(qrt, http, ControlUrls(qrt))


async def queued(rt: Runtime) -> int:
    return sum([await rt.redis.zcard(shard) for shard in rt.keys.end_queue_shards])


async def test_an_unheld_call_is_ended_once(qrt: Runtime, fake: FakeVapi, http: httpx.AsyncClient) -> None:
    assert await end_unheld_call(qrt, "stray", fake.control_url("stray"), org_id=None, reason="unattributed")
    ttl_ms = await qrt.redis.pttl(qrt.keys.end_queue_entry("stray"))
    assert 0 < ttl_ms <= qrt.settings.kill_end_queue_ttl_ms  # the entry cannot outlive its TTL
    report = await run_round(qrt, http, ControlUrls(qrt))
    assert (report.ended_unheld, report.failed_attempts) == (1, 0)
    assert fake.control_bodies("stray") == [END]
    assert fake.to("/stray/control")[0].headers["authorization"] == f"Bearer {QUEUE_SETTINGS['vapi_control_token']}"
    assert await queued(qrt) == 0 and await qrt.redis.exists(qrt.keys.end_queue_entry("stray")) == 0
    assert (await run_round(qrt, http, ControlUrls(qrt))).ended_unheld == 0
    assert fake.control_bodies("stray") == [END]


async def test_a_second_enqueue_while_pending_changes_nothing(
    qrt: Runtime, clock: ManualClock, fake: FakeVapi, http: httpx.AsyncClient
) -> None:
    t0 = clock.value_ms
    fake.scripted["/twice/control"] = [500]
    assert await end_unheld_call(qrt, "twice", fake.control_url("twice"), org_id=None, reason="resolved, live again")
    assert await end_unheld_call(qrt, "twice", fake.control_url("twice"), org_id=None, reason="resolved, live again")
    assert (await at(qrt, clock, t0, 0, http)).failed_attempts == 1
    # Enqueued again mid-backoff: neither due at once nor its attempts reset.
    assert await end_unheld_call(qrt, "twice", fake.control_url("twice"), org_id=None, reason="resolved, live again")
    assert (await at(qrt, clock, t0, 0.5, http)).ended_unheld == 0
    assert (await at(qrt, clock, t0, 1, http)).ended_unheld == 1
    assert fake.control_bodies("twice") == [END, END]
    # Two enqueues before any round: one end-call.
    assert await end_unheld_call(qrt, "double", fake.control_url("double"), org_id=None, reason="unattributed")
    assert await end_unheld_call(qrt, "double", fake.control_url("double"), org_id=None, reason="unattributed")
    assert (await at(qrt, clock, t0, 2, http)).ended_unheld == 1
    assert fake.control_bodies("double") == [END]


async def test_failing_twice_then_answering_takes_three_attempts_with_backoff(
    qrt: Runtime, clock: ManualClock, fake: FakeVapi, http: httpx.AsyncClient
) -> None:
    t0 = clock.value_ms
    fake.scripted["/flaky/control"] = [500, 503]
    assert await end_unheld_call(qrt, "flaky", fake.control_url("flaky"), org_id=None, reason="unattributed")
    assert (await at(qrt, clock, t0, 0, http)).failed_attempts == 1
    assert (await at(qrt, clock, t0, 0.999, http)).failed_attempts == 0  # backing off: 1 s
    assert (await at(qrt, clock, t0, 1, http)).failed_attempts == 1
    assert (await at(qrt, clock, t0, 2.999, http)).ended_unheld == 0  # then 2 s
    assert (await at(qrt, clock, t0, 3, http)).ended_unheld == 1
    assert (await at(qrt, clock, t0, 60, http)).ended_unheld == 0
    assert fake.control_bodies("flaky") == [END, END, END]


async def test_always_failing_is_given_up_alerted_and_counted(
    qrt: Runtime, clock: ManualClock, fake: FakeVapi, http: httpx.AsyncClient
) -> None:
    org_id = await new_org(qrt, 100)
    fake.always["/dead/control"] = 500
    fake.always["/orphan/control"] = 500
    assert await end_unheld_call(qrt, "dead", fake.control_url("dead"), org_id=org_id, reason="resolved, live again")
    assert await end_unheld_call(qrt, "orphan", fake.control_url("orphan"), org_id=None, reason="unattributed")
    loops = TimedLoops(qrt)  # the worker's own loop, which counts what its kill switch did
    t0 = clock.value_ms
    try:
        for t in range(0, 10):  # attempts at 0, 1 and 3 s; given up at 7 s (after 1 + 2 + 4 s)
            clock.advance(t0 + t * 1000 - clock.value_ms)
            await loops.kill_switch_round()
            await loops.kill_switch.drain()
    finally:
        await loops.close()
    assert len(fake.control_bodies("dead")) == 3 and len(fake.control_bodies("orphan")) == 3
    counters = await qrt.redis.hgetall(qrt.keys.worker_counters)
    assert (counters["kill_given_up"], counters["kill_failed_attempts"]) == ("2", "6")
    assert await queued(qrt) == 0
    rows = await qrt.pg.fetch(
        "SELECT org_id, kind, call_id, idempotency_key, payload::text AS payload FROM alert_events"
    )
    assert [(r["org_id"], r["kind"], r["call_id"], r["idempotency_key"]) for r in rows] == [
        (org_id, "end_call_failed", "dead", end_call_failed_alert_key(org_id, "dead"))
    ]  # the orphan has no org to alert
    assert (
        '"reason": "resolved, live again"' in rows[0]["payload"] and '"type": "end_call_failed"' in rows[0]["payload"]
    )
    # A give-up is once per call: the same call given up again adds no second alert.
    assert await end_unheld_call(qrt, "dead", fake.control_url("dead"), org_id=org_id, reason="resolved, live again")
    for t in range(10, 20):
        await at(qrt, clock, t0, t, http)
    assert await qrt.pg.fetchval("SELECT count(*) FROM alert_events") == 1


async def test_no_usable_control_url_is_refused_logged_and_counted(
    qrt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    refused = [
        ("no-url", None),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("evil", "https://evil.example/evil/control"),
        ("bad id {x}", "https://aws-us-west-2-production1-phone-call-websocket.vapi.ai/x/control"),
    ]
    for call_id, url in refused:
        assert not await end_unheld_call(qrt, call_id, url, org_id=None, reason="unattributed")
    assert await queued(qrt) == 0
    assert await qrt.redis.hget(qrt.keys.worker_counters, "kill_end_unheld_refused") == str(len(refused))
    assert sum(r.levelname == "ERROR" for r in caplog.records) == len(refused)


async def test_two_workers_push_a_queued_call_once(qrt: Runtime, fake: FakeVapi, http: httpx.AsyncClient) -> None:
    fake.delay_s["/shared/control"] = 0.2
    assert await end_unheld_call(qrt, "shared", fake.control_url("shared"), org_id=None, reason="unattributed")
    workers = [KillSwitch(qrt, http, ControlUrls(qrt)) for _ in range(2)]
    await asyncio.gather(*(w.round() for w in workers))
    await asyncio.gather(*(w.drain() for w in workers))
    assert sum(w.take_report().ended_unheld for w in workers) == 1
    assert fake.control_bodies("shared") == [END]


async def test_an_entry_that_is_not_ours_is_dropped_not_retried_forever(
    qrt: Runtime, fake: FakeVapi, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    await qrt.redis.set(qrt.keys.end_queue_entry("garbled"), b"not json")
    await qrt.redis.zadd(qrt.keys.end_queue("garbled"), {"garbled": 1})
    report = await run_round(qrt, http, ControlUrls(qrt))
    assert (report.ended_unheld, report.failed_attempts) == (0, 0)
    assert await queued(qrt) == 0 and fake.received == []
    assert any("not one of ours" in r.getMessage() for r in caplog.records)
