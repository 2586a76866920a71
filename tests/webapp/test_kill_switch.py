"""The kill switch, pushed: Vapi's webhooks (built with Vapi's SDK) go to the real web app, the
worker's round (engine/killswitch.run_round) POSTs to a fake Vapi over real HTTP, Redis and
Postgres are real, and time is a ManualClock shared by both, so deadlines are checked to the
second without sleeping."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from vapi.types import Call

from credit_engine.engine.alerts import deliver_due, org_signing_secret, outbound_for_alerts, verify
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.holds import CallEvent, check_call, commit_call, expire_call, reserve_call
from credit_engine.engine.killswitch import KillSwitch, RoundReport, run_round
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.outbound import Outbound
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.fake_vapi import FakeVapi, fake_vapi_server
from tests.helpers import new_org
from tests.processes import wait_for
from tests.webapp import vapi_payloads as payloads
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api

KILL_SETTINGS = {
    "kill_warn_lead_ms": 10_000,
    "kill_backoff_base_ms": 1_000,
    "kill_backoff_max_ms": 4_000,
    "kill_attempts_max": 3,
    "alert_signing_key": "alert-signing-key-for-tests-" + "c" * 20,
    "alert_backoff_base_ms": 1,
    "outbound_allow_private": True,  # the fake receiver listens on 127.0.0.1
}
RATE = 60  # pence per minute: a penny a second
SAY = {"type": "say", "content": Settings.kill_warning_text, "endCallAfterSpoken": False}
END = {"type": "end-call"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeVapi]:
    async with fake_vapi_server() as server:
        yield server


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET, **KILL_SETTINGS)


@pytest.fixture
async def worker_rt(settings: Settings, clock: ManualClock, fake: FakeVapi) -> AsyncIterator[Runtime]:
    # Control URLs are Vapi's (https://…vapi.ai/<call>/control); the base URL routes them to the fake.
    runtime = await Runtime.open(replace(settings, vapi_control_base_url=fake.base_url, **KILL_SETTINGS), clock=clock)
    yield runtime
    await runtime.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def outbound() -> AsyncIterator[Outbound]:
    alerts_out = outbound_for_alerts(allow_private=True)
    yield alerts_out
    await alerts_out.aclose()


class World:
    def __init__(
        self, api: Api, rt: Runtime, http: httpx.AsyncClient, fake: FakeVapi, clock: ManualClock, outbound: Outbound
    ) -> None:
        self.api, self.rt, self.http, self.fake, self.clock = api, rt, http, fake, clock
        self.outbound = outbound
        self.t0_ms = clock.value_ms

    async def org(self, balance_pence: int, **settings: object) -> tuple[str, str, str]:
        org_id, key = await self.api.new_org(
            balance_pence,
            rate_pence_per_minute=RATE,
            min_start_pence=10,
            hold_block_minutes=1,
            grace_seconds=5,
            **settings,
        )
        return org_id, key, await self.api.register_number(org_id)

    async def start_call(self, number: str, call_id: str, control_url: str | None = None) -> Call:
        the_call = payloads.call(
            call_id, phone_number_id=number, control_url=control_url or self.fake.control_url(call_id)
        )
        answer = (await self.api.vapi(payloads.assistant_request(the_call))).json()
        assert "assistantId" in answer, answer
        assert (await self.api.vapi(payloads.status_update(the_call, "in-progress"))).json() == {}
        return the_call

    def at(self, seconds: float) -> None:
        """Move the shared clock to t0 + seconds."""
        target = self.t0_ms + int(seconds * 1000)
        self.clock.advance(target - self.clock.value_ms)

    async def round(self) -> RoundReport:
        return await run_round(self.rt, self.http, ControlUrls(self.rt))

    async def scheduled_ms(self, org_id: str) -> float | None:
        return await self.rt.redis.zscore(self.rt.keys.kill_schedule(org_id), org_id)


@pytest.fixture
def world(
    api: Api, worker_rt: Runtime, http: httpx.AsyncClient, fake: FakeVapi, clock: ManualClock, outbound: Outbound
) -> World:
    return World(api, worker_rt, http, fake, clock, outbound)


async def test_two_calls_sharing_90s_of_credit_are_warned_then_ended_at_the_predicted_moment(world: World) -> None:
    org_id, key, number = await world.org(90 * RATE // 60)  # 90 p: 90 s of one call
    a = await world.start_call(number, "call-a")
    b = await world.start_call(number, "call-b")
    # Two calls burn 2 p/s: the credit runs out at t0 + 45 s.
    assert await world.scheduled_ms(org_id) == world.t0_ms + 45_000

    world.at(34.999)
    assert (await world.round()).warned == 0
    assert world.fake.received == []
    world.at(35)  # 10 s before depletion
    assert (await world.round()).warned == 2
    assert world.fake.control_bodies("call-a") == [SAY]
    assert world.fake.control_bodies("call-b") == [SAY]
    world.at(49.999)  # depletion + grace (5 s) not reached: nothing more
    assert (await world.round()).ended == 0
    world.at(50)
    assert (await world.round()).ended == 2
    assert world.fake.control_bodies("call-a") == [SAY, END]
    assert world.fake.control_bodies("call-b") == [SAY, END]
    world.at(80)
    await world.round()
    assert len(world.fake.received) == 4  # warned once, ended once, each

    # Vapi ends the calls and reports them: 50 s each.
    for the_call in (a, b):
        assert (await world.api.vapi(payloads.end_of_call_report(the_call, 50))).json() == {}
    wallet = (await world.api.as_org(key, "GET", "/api/wallet")).json()
    spent = 90 - wallet["balance_pence"] + wallet["debt_pence"]
    assert spent == 100  # the true cost of 2 x 50 s, nothing given away
    assert spent <= 90 + 5 * RATE // 60 * 2  # balance + grace x rate x calls


async def test_a_second_call_starting_mid_way_moves_the_first_calls_deadline_earlier(world: World) -> None:
    org_id, _, number = await world.org(90)
    await world.start_call(number, "first")
    assert await world.scheduled_ms(org_id) == world.t0_ms + 90_000
    world.at(30)
    await world.start_call(number, "second")
    # 30 p spent by the first call; 60 p left at 2 p/s: 30 s more.
    assert await world.scheduled_ms(org_id) == world.t0_ms + 60_000
    world.at(49.5)
    assert (await world.round()).warned == 0
    world.at(50)
    assert (await world.round()).warned == 2
    world.at(65)
    assert (await world.round()).ended == 2
    assert world.fake.control_bodies("first") == [SAY, END]


async def test_a_top_up_in_the_warning_window_cancels_the_end_call(world: World) -> None:
    org_id, key, number = await world.org(90)
    await world.start_call(number, "c")
    world.at(80)
    assert (await world.round()).warned == 1
    topped = await world.api.admin(
        "POST", f"/api/admin/orgs/{org_id}/topups", {"amount_pence": 60}, headers={"Idempotency-Key": "rescue"}
    )
    assert topped.status_code == 201
    assert await world.scheduled_ms(org_id) <= world.t0_ms + 150_000  # filed (never later than before)
    for t in (81, 90, 95, 100, 120):
        world.at(t)
        assert (await world.round()).ended == 0
    assert world.fake.control_bodies("c") == [SAY]
    world.at(140)  # the new credit runs low in turn: warned again, and ended at 155
    assert (await world.round()).warned == 1
    world.at(155)
    assert (await world.round()).ended == 1
    assert world.fake.control_bodies("c") == [SAY, SAY, END]


async def test_a_control_url_failing_twice_then_answering_ends_the_call_once(world: World) -> None:
    org_id, _, number = await world.org(90)
    await world.start_call(number, "c")
    world.at(95)  # past depletion + grace: straight to the end-call
    world.fake.scripted["/c/control"] = [500, 503]
    first = await world.round()
    assert (first.ended, first.failed_attempts) == (0, 1)
    assert (await world.round()).failed_attempts == 0  # backing off: not before 1 s
    world.at(96)
    assert (await world.round()).failed_attempts == 1
    world.at(97.999)
    assert (await world.round()).ended == 0
    world.at(98)  # 2 s after the second attempt
    assert (await world.round()).ended == 1
    world.at(200)
    await world.round()
    assert world.fake.control_bodies("c") == [END, END, END]  # two refused, one taken, then no more
    await drain_org_fully(world.rt, org_id)
    alerts = await world.rt.pg.fetch("SELECT kind, call_id FROM alert_events WHERE org_id = $1", org_id)
    assert [(r["kind"], r["call_id"]) for r in alerts] == [("call_ended_no_credit", "c")]


async def test_a_control_url_that_always_fails_is_given_up_flagged_and_alerted(world: World) -> None:
    org_id, key, number = await world.org(90, alert_webhook_url=f"{world.fake.base_url}/hook")
    await world.start_call(number, "c")
    world.fake.always["/c/control"] = 500
    given_up = 0
    for t in range(95, 120):
        world.at(t)
        given_up += (await world.round()).given_up
    assert given_up == 1
    assert len(world.fake.control_bodies("c")) == KILL_SETTINGS["kill_attempts_max"]
    await drain_org_fully(world.rt, org_id)
    delivered = await deliver_due(world.rt, world.outbound)
    assert delivered.delivered == 1
    [hook] = world.fake.to("/hook")
    assert hook.json["type"] == "end_call_failed" and hook.json["call_id"] == "c"
    listed = (await world.api.as_org(key, "GET", "/api/alerts")).json()["alerts"]
    assert [(a["type"], a["status"]) for a in listed] == [("end_call_failed", "delivered")]


async def test_low_balance_alerts_once_per_crossing_signed_and_retried(world: World) -> None:
    from credit_engine.engine.assets import deduct_asset

    rt = world.rt
    org_id, key, _ = await world.org(
        100, low_balance_threshold_pence=50, alert_webhook_url=f"{world.fake.base_url}/hook"
    )
    assert (await deduct_asset(rt, org_id, "a1", 40)).outcome == Outcome.ok  # 60 left: above
    assert (await deduct_asset(rt, org_id, "a2", 20)).outcome == Outcome.ok  # 40: crossed
    assert (await deduct_asset(rt, org_id, "a3", 10)).outcome == Outcome.ok  # 30: still below, no second alert
    topped = await world.api.admin(
        "POST", f"/api/admin/orgs/{org_id}/topups", {"amount_pence": 100}, headers={"Idempotency-Key": "t1"}
    )
    assert topped.status_code == 201  # 130: re-armed
    assert (await deduct_asset(rt, org_id, "a4", 90)).outcome == Outcome.ok  # 40: crossed again
    assert (await deduct_asset(rt, org_id, "a5", 40)).outcome == Outcome.ok  # 0: exhausted
    await drain_org_fully(rt, org_id)

    world.fake.scripted["/hook"] = [500]  # the receiver fails once
    await deliver_due(rt, world.outbound)
    for _ in range(20):
        await asyncio.sleep(0.01)
        await deliver_due(rt, world.outbound)
    hooks = world.fake.to("/hook")
    kinds = [h.json["type"] for h in hooks]
    assert sorted(kinds) == ["balance_exhausted", "low_balance", "low_balance", "low_balance"]  # one retried
    assert [h.json["available_pence"] for h in hooks if h.json["type"] == "low_balance"] == [40, 40, 40]
    secret = (await world.api.as_org(key, "GET", "/api/alerts/signing-secret")).json()["signing_secret"]
    assert secret == org_signing_secret(KILL_SETTINGS["alert_signing_key"], org_id)
    for h in hooks:
        assert verify(secret, h.headers["credit-engine-signature"], h.body)
        assert not verify("wrong-secret", h.headers["credit-engine-signature"], h.body)
    statuses = await rt.pg.fetch(
        "SELECT kind, status, attempts FROM alert_events WHERE org_id = $1 ORDER BY id", org_id
    )
    assert [(r["kind"], r["status"]) for r in statuses] == [
        ("low_balance", "delivered"),
        ("low_balance", "delivered"),
        ("balance_exhausted", "delivered"),
    ]
    assert sorted(r["attempts"] for r in statuses) == [1, 1, 2]


async def test_max_duration_answered_at_assistant_request_is_what_the_credit_funds(world: World) -> None:
    _, _, number = await world.org(90)
    the_call = payloads.call("c", phone_number_id=number)
    answer = (await world.api.vapi(payloads.assistant_request(the_call))).json()
    assert answer["assistantOverrides"]["maxDurationSeconds"] == 90


async def test_expiry_racing_a_late_report_bills_exactly_once_the_true_cost(rt: Runtime, clock: ManualClock) -> None:
    """Expiry and the report run concurrently on separate connections, many times over; whichever
    wins, the call ends up charged its true cost exactly once."""
    org_id = await new_org(rt, 100_000, rate_pence_per_minute=RATE)
    for i in range(40):
        call_id = f"race-{i}"
        reservation = await reserve_call(rt, org_id, call_id)
        assert reservation.outcome == Outcome.ok
        await check_call(rt, org_id, call_id, CallEvent.start)
        clock.advance(20_000)
        await check_call(rt, org_id, call_id)  # last seen 20 s in
        clock.advance(reservation.max_duration_s * 1000 + rt.settings.hold_report_slack_ms)
        true_seconds = 20 + i % 7  # the report knows better than what was last seen
        before = await rt.redis.hget(rt.keys.org(org_id).org, "balance_pence")
        results = await asyncio.gather(expire_call(rt, org_id, call_id), commit_call(rt, org_id, call_id, true_seconds))
        after = await rt.redis.hget(rt.keys.org(org_id).org, "balance_pence")
        assert int(before) - int(after) == true_seconds * RATE // 60, results
        assert (await commit_call(rt, org_id, call_id, true_seconds)).outcome == Outcome.replayed
        assert (await expire_call(rt, org_id, call_id)).outcome == Outcome.replayed
    await drain_org_fully(rt, org_id)
    rows = await rt.pg.fetch(
        "SELECT call_id, sum(amount_pence) AS total FROM ledger_entries WHERE org_id = $1 AND call_id IS NOT NULL "
        "GROUP BY call_id",
        org_id,
    )
    assert {r["call_id"]: -r["total"] for r in rows} == {f"race-{i}": (20 + i % 7) for i in range(40)}


async def test_the_concurrency_limit_refuses_at_assistant_request_with_a_spoken_error(world: World) -> None:
    from credit_engine.webapp.vapi import SPOKEN_BUSY

    _, key, number = await world.org(10_000, max_concurrent_calls=1)
    await world.start_call(number, "one")
    answer = (await world.api.vapi(payloads.assistant_request(payloads.call("two", phone_number_id=number)))).json()
    assert answer == {"error": SPOKEN_BUSY}
    holds = (await world.api.as_org(key, "GET", "/api/wallet/holds")).json()
    assert [h["call_id"] for h in holds["items"]] == ["one"]


# At scale: pushes are tasks of their own (issue 12) ------------------------------------------


async def _received(fake: FakeVapi, path: str) -> bool:
    return bool(fake.to(path))


async def test_a_slow_control_url_holds_up_neither_the_round_nor_another_orgs_end_call(world: World) -> None:
    slow_org, _, slow_number = await world.org(90)
    _, _, fast_number = await world.org(90)
    await world.start_call(slow_number, "slow")
    await world.start_call(fast_number, "fast")
    world.fake.delay_s["/slow/control"] = 3.0  # far past the push deadline (0.9 s)
    kill_switch = KillSwitch(world.rt, world.http, ControlUrls(world.rt))
    world.at(95)  # both orgs past depletion + grace
    await kill_switch.round()
    slow_push = (False, slow_org, "slow", "end")
    assert slow_push in kill_switch.pushes  # the round returned with the slow push under way
    await wait_for(lambda: _received(world.fake, "/fast/control"), 2, "the other org's end-call", interval_s=0.01)
    assert slow_push in kill_switch.pushes  # it came while the slow one was still waiting
    world.at(96)  # the tick's backoff is over but the first push is not: it is not sent twice
    await kill_switch.round()
    assert len(world.fake.control_bodies("slow")) == 1
    await kill_switch.drain()  # the slow push ends at its deadline: a failed attempt
    report = kill_switch.take_report()
    assert (report.ended, report.failed_attempts, report.skipped_in_flight) == (1, 1, 1)
    del world.fake.delay_s["/slow/control"]
    world.at(98)  # the skipped attempt counted (the tick handed it out): this is the third and last
    assert (await world.round()).ended == 1
    assert world.fake.control_bodies("slow") == [END, END]
    assert world.fake.control_bodies("fast") == [END]


async def test_pushes_in_flight_are_bounded_and_a_full_worker_leaves_orgs_due(world: World) -> None:
    rt = replace(world.rt, settings=replace(world.rt.settings, kill_pushes_in_flight_max=2))
    _, _, busy_number = await world.org(240)  # four calls at 1 p/s each: depletion at 60 s
    for n in range(4):
        await world.start_call(busy_number, f"busy-{n}")
        world.fake.delay_s[f"/busy-{n}/control"] = 0.3
    late_org, _, late_number = await world.org(120)  # one call: depletion at 120 s
    await world.start_call(late_number, "late")
    kill_switch = KillSwitch(rt, world.http, ControlUrls(rt))
    world.at(65)
    await kill_switch.round()
    assert len(kill_switch.pushes) == 4 and kill_switch.full  # one visit may overshoot by its org's calls
    world.at(125)
    await kill_switch.round()  # full: nobody is visited, the late org stays due
    assert kill_switch.take_report().visited == 1
    await kill_switch.drain()
    assert world.fake.in_flight_max == 2  # never more than the limit at once
    assert world.fake.control_bodies("late") == []
    assert await world.scheduled_ms(late_org) is not None
    await kill_switch.round()
    await kill_switch.drain()
    assert world.fake.control_bodies("late") == [END]
    assert [len(world.fake.control_bodies(f"busy-{n}")) for n in range(4)] == [1, 1, 1, 1]
    assert kill_switch.take_report().ended == 5


async def test_the_next_round_comes_when_the_next_org_is_due_not_a_whole_poll_later(world: World) -> None:
    _, _, number = await world.org(90)  # one call: depletion at 90 s, warned at 80 s
    await world.start_call(number, "c")
    kill_switch = KillSwitch(world.rt, world.http, ControlUrls(world.rt))
    poll_s = world.rt.settings.kill_poll_interval_ms / 1000
    assert await kill_switch.round() == poll_s  # nothing due for 80 s: look again after a poll
    world.at(79.95)
    assert await kill_switch.round() == pytest.approx(0.05)  # the warning is due in 50 ms
    world.at(80)
    await kill_switch.round()
    await kill_switch.drain()
    assert world.fake.control_bodies("c") == [SAY]
    world.at(94.97)  # the end-call is due at 95 s (and the warning's recheck at 81 s has passed)
    assert await kill_switch.round() == pytest.approx(0.03)


# Control URLs only on Vapi's hosts ------------------------------------------------------------

CONTROL_TOKEN = "vapi-control-token-" + "d" * 24
OFF_VAPI = {
    "meta": "http://169.254.169.254/latest/meta-data/meta/control",
    "evil": "https://evil.example/evil/control",
    "suffix": "https://vapi.ai.evil.example/suffix/control",
    "userinfo": "https://aws-us-west-2-production1-phone-call-websocket.vapi.ai@evil.example/userinfo/control",
}


async def test_a_control_url_off_vapis_hosts_never_gets_a_request_or_the_token(world: World) -> None:
    # With the base URL set, an unchecked URL's path would reach the fake: nothing may.
    rt = replace(world.rt, settings=replace(world.rt.settings, vapi_control_token=CONTROL_TOKEN))
    _, _, number = await world.org(300)  # five calls: depletion at 60 s, the end-calls at 65 s
    await world.start_call(number, "good")
    for call_id, url in OFF_VAPI.items():
        await world.start_call(number, call_id, control_url=url)
    reports = []
    for t in (65, 66, 68, 72):  # three attempts each (1 s, 2 s backoff), then given up
        world.at(t)
        reports.append(await run_round(rt, world.http, ControlUrls(rt)))
    assert [r.path for r in world.fake.received] == ["/good/control"]
    assert world.fake.received[0].headers["authorization"] == f"Bearer {CONTROL_TOKEN}"
    assert sum(r.ended for r in reports) == 1
    assert sum(r.failed_attempts for r in reports) == 3 * len(OFF_VAPI)  # refused: failed attempts, nothing sent
    assert sum(r.given_up for r in reports) == len(OFF_VAPI)


async def test_without_a_base_url_a_loopback_control_url_is_not_called(world: World) -> None:
    rt = replace(
        world.rt, settings=replace(world.rt.settings, vapi_control_base_url=None, vapi_control_token=CONTROL_TOKEN)
    )
    _, _, number = await world.org(90)
    await world.start_call(number, "direct", control_url=f"{world.fake.base_url}/direct/control")  # a listener of ours
    world.at(95)
    report = await run_round(rt, world.http, ControlUrls(rt))
    assert (report.ended, report.failed_attempts) == (0, 1)
    assert world.fake.received == []
