"""Calls that enter without the main lifecycle (issue 12): first seen mid-flight, naming an org
in their variableValues, replayed after Redis forgot them, on a suspended number. Each test
checks the promise (who pays, how much, what Vapi was told) over real HTTP: Vapi's messages built
with its SDK to the real app, the worker's kill switch pushing to a fake Vapi, real Redis and
Postgres, one ManualClock."""

from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
from vapi.types import Call

from credit_engine.engine.config import Settings
from credit_engine.engine.holds import release_call
from credit_engine.engine.idempotency import call_state_key
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.phone_numbers import forget_owner
from credit_engine.webapp.vapi import SPOKEN_BUSY, SPOKEN_NO_CREDIT
from tests.helpers import assert_books_agree
from tests.webapp import vapi_payloads as payloads
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET
from tests.webapp.test_kill_switch import END, KILL_SETTINGS, RATE, World, fake, http, outbound, worker_rt, world  # noqa: F401
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet

# Bodies an adversarial review sent: each a 200 (Vapi) or a 4xx, never a 5xx.
HOSTILE: list[dict[str, Any]] = [
    {"message": {"type": "status-update", "status": "in-progress", "call": {"id": "h-1", "phoneNumberId": "x" * 256}}},
    {
        "message": {
            "type": "status-update",
            "status": "in-progress",
            "call": {"id": "h-2", "phoneNumberId": "\u00e9\u2603"},
        }
    },
    {"message": {"type": "status-update", "status": "in-progress", "call": {"id": "h-3"}, "phoneNumber": {"id": 7}}},
    {
        "message": {
            "type": "status-update",
            "status": "in-progress",
            "call": {"id": "h-4", "assistantOverrides": {"variableValues": {"org_id": "x" * 300}}},
        }
    },
    {
        "message": {
            "type": "status-update",
            "status": "in-progress",
            "call": {"id": "h-5", "assistantOverrides": {"variableValues": {"org_id": "ORG*?[a]"}}},
        }
    },
    {
        "message": {
            "type": "end-of-call-report",
            "call": {"id": "h-6", "phoneNumberId": "pn-nope"},
            "startedAt": "2026-01-01T00:00:00Z",
            "endedAt": "1970-01-01T00:00:00Z",
        }
    },
    {"message": {"type": "end-of-call-report", "call": {"id": "h-7"}, "durationSeconds": 1e308}},
    {
        "message": {
            "type": "end-of-call-report",
            "call": {"id": "h-8"},
            "startedAt": "0001-01-01T00:00:00Z",
            "endedAt": "9999-12-31T23:59:59.999999Z",
        }
    },
    {
        "message": {
            "type": "status-update",
            "status": "in-progress",
            "call": {"id": "h-9", "monitor": {"controlUrl": "ftp://x"}},
        }
    },
    {"message": {"type": "assistant-request", "call": {"id": "h-10", "phoneNumberId": ["a"]}}},
]


@pytest.fixture
def app_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    extra = getattr(request, "param", {})
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET, **KILL_SETTINGS, **extra)


def running(
    world: World, call_id: str, number: str | None, *, hint: str | None = None, call_type: str = "outboundPhoneCall"
) -> Call:
    return payloads.call(
        call_id, phone_number_id=number, org_hint=hint, control_url=world.fake.control_url(call_id), call_type=call_type
    )


async def in_progress(world: World, the_call: Call) -> None:
    assert (await world.api.vapi(payloads.status_update(the_call, "in-progress"))).json() == {}


async def hang_up(world: World, the_call: Call, seconds: float) -> None:
    """Vapi ends the call after `seconds` and reports it (times from T0, the call's start)."""
    assert (await world.api.vapi(payloads.status_update(the_call, "ended"))).json() == {}
    assert (await world.api.vapi(payloads.end_of_call_report(the_call, seconds))).json() == {}


async def org_ledger(world: World, org_id: str) -> list[tuple[str, int]]:
    return await ledger_kinds(world.api, org_id)


async def test_live_calls_that_cannot_be_funded_are_ended_at_once_and_billed(world: World) -> None:
    """Five outbound calls first seen at in-progress on 100p: the credit funds two; the other three
    are ended at once through their control URLs. Spend stays within balance + grace x rate x calls."""
    org_id, key, number = await world.org(100)
    calls = [running(world, f"out-{i}", number) for i in range(5)]
    for the_call in calls:
        await in_progress(world, the_call)
    assert (await wallet(world.api, key))["live_calls"] == 5  # each counts while it lives
    ended_now = await world.round()
    assert ended_now.ended == 3
    assert [world.fake.control_bodies(f"out-{i}") for i in range(5)] == [[], [], [END], [END], [END]]
    for the_call in calls[2:]:
        await hang_up(world, the_call, 1)
    # Two funded calls burn 2p/s on 100p: depletion at 50 s, ended at 55 s (5 s grace).
    world.at(55)
    assert (await world.round()).ended == 2
    for the_call in calls[:2]:
        await hang_up(world, the_call, 55)
    balance = await assert_books_agree(world.rt, org_id)
    debt = (await wallet(world.api, key))["debt_pence"]
    spent = 100 - balance + debt
    assert spent == 2 * 55 + 3 * 1  # charged in full: what the balance could not pay is debt, never dropped
    assert (balance, debt) == (0, 13)
    assert spent <= 100 + 5 * RATE // 60 * 5  # balance + grace x rate x live calls


async def test_an_unfunded_call_counts_against_the_limit_while_it_lives(world: World) -> None:
    org_id, key, number = await world.org(10_000, max_concurrent_calls=1)
    first = await world.start_call(number, "first")
    over = running(world, "over-the-limit", number)
    await in_progress(world, over)  # at the limit: recorded unfunded, ended at once
    assert (await world.round()).ended == 1
    assert world.fake.control_bodies("over-the-limit") == [END]
    # While it lives, it holds a line: a new inbound call is refused.
    answer = await world.api.vapi(payloads.assistant_request(payloads.call("third", phone_number_id=number)))
    assert answer.json() == {"error": SPOKEN_BUSY}
    await hang_up(world, over, 2)
    await hang_up(world, first, 30)
    answer = await world.api.vapi(payloads.assistant_request(payloads.call("fourth", phone_number_id=number)))
    assert "assistantId" in answer.json()
    await drain_org_fully(world.rt, org_id)
    assert await org_ledger(world, org_id) == [("topup", 10_000), ("call_charge", -2), ("call_charge", -30)]


async def test_the_org_hint_bills_only_an_org_that_admitted_the_call(world: World) -> None:
    victim, victim_key, _ = await world.org(5_000)
    platform, platform_key, _ = await world.org(5_000)
    # A web call and an outbound call from a number not registered here, each naming the victim.
    web = running(world, "web-1", None, hint=victim, call_type="webCall")
    stranger = running(world, "out-stranger", "pn-not-ours", hint=victim)
    for the_call in (web, stranger):
        await in_progress(world, the_call)
    assert (await wallet(world.api, victim_key))["live_calls"] == 0
    assert (await world.round()).ended == 0  # no org holds them: the end queue ends them
    assert world.fake.control_bodies("web-1") == [END]
    assert world.fake.control_bodies("out-stranger") == [END]
    for the_call in (web, stranger):
        await hang_up(world, the_call, 120)
    # A web call the platform reserved through the API, naming itself: billed to it alone.
    assert (await world.api.as_org(platform_key, "POST", "/api/calls/web-2/reserve")).status_code == 201
    reserved = running(world, "web-2", None, hint=platform, call_type="webCall")
    await in_progress(world, reserved)
    await hang_up(world, reserved, 60)
    # And one reserved by the platform but naming the victim: the platform admitted it, it pays.
    assert (await world.api.as_org(platform_key, "POST", "/api/calls/web-3/reserve")).status_code == 201
    misnamed = running(world, "web-3", None, hint=victim, call_type="webCall")
    await in_progress(world, misnamed)
    await hang_up(world, misnamed, 30)
    assert await assert_books_agree(world.rt, victim) == 5_000
    assert await org_ledger(world, victim) == [("topup", 5_000)]
    assert await assert_books_agree(world.rt, platform) == 5_000 - 60 - 30
    metrics = (await world.api.client.get("/metrics")).text
    assert 'credit_engine_vapi_messages_total{result="unattributed",type="status-update"}' in metrics


@pytest.mark.parametrize("app_settings", [{"unattributed_calls": "allow"}], indirect=True)
async def test_unattributed_calls_may_be_allowed_to_run_but_still_bill_nobody(world: World) -> None:
    victim, victim_key, _ = await world.org(5_000)
    web = running(world, "web-allowed", None, hint=victim, call_type="webCall")
    await in_progress(world, web)
    await world.round()
    assert world.fake.control_bodies("web-allowed") == []
    await hang_up(world, web, 90)
    assert await assert_books_agree(world.rt, victim) == 5_000


async def test_a_status_update_and_report_replayed_after_the_window_charge_nothing_and_hold_nothing(
    world: World,
) -> None:
    org_id, key, number = await world.org(10_000, max_concurrent_calls=1)
    done = await world.start_call(number, "done")
    await hang_up(world, done, 60)
    await drain_org_fully(world.rt, org_id)
    # A week and more later Redis has forgotten the call; Vapi's messages come again.
    world.clock.advance(world.rt.settings.idempotency_ttl_ms + 86_400_000)
    await release_call(world.rt, org_id, "pruner")  # any resolution prunes the org's expired records
    assert not await world.rt.redis.hexists(world.rt.keys.org(org_id).idem, call_state_key(org_id, "done"))
    live = await world.start_call(number, "live")
    assert (await wallet(world.api, key))["live_calls"] == 1
    await in_progress(world, done)  # replayed: no phantom hold
    held = await wallet(world.api, key)
    assert (held["live_calls"], held["held_pence"]) == (1, 60 * RATE // 60 * 1)  # only "live"'s one-minute block
    await world.api.vapi(payloads.end_of_call_report(done, 60))
    await world.round()
    assert world.fake.control_bodies("live") == []  # the org's real call is not ended early
    await hang_up(world, live, 10)
    assert await assert_books_agree(world.rt, org_id) == 10_000 - 60 - 10
    assert [kind for kind, _ in await org_ledger(world, org_id)] == ["topup", "call_charge", "call_charge"]


async def test_a_suspended_number_admits_no_call_first_seen_at_in_progress(world: World) -> None:
    org_id, key, number = await world.org(10_000)
    await world.rt.pg.execute("UPDATE phone_numbers SET status = 'suspended' WHERE vapi_phone_number_id = $1", number)
    await forget_owner(world.rt, number)
    out_call = running(world, "out-suspended", number)
    await in_progress(world, out_call)
    assert (await world.round()).ended == 1  # not funded: ended at once
    assert world.fake.control_bodies("out-suspended") == [END]
    await hang_up(world, out_call, 3)
    # Its owner pays for the seconds it ran (its number, its call), nothing more.
    assert await assert_books_agree(world.rt, org_id) == 10_000 - 3


async def test_a_control_url_off_vapis_hosts_is_never_kept_nor_called(world: World) -> None:
    org_id, key, number = await world.org(90)
    the_call = payloads.call("metadata", phone_number_id=number, control_url="http://169.254.169.254/latest/meta-data")
    assert "assistantId" in (await world.api.vapi(payloads.assistant_request(the_call))).json()
    await in_progress(world, the_call)
    assert await world.rt.redis.hgetall(world.rt.keys.org(org_id).control) == {}
    world.at(200)
    await world.round()
    assert world.fake.received == []


async def test_an_old_call_first_seen_live_while_postgres_is_slow_takes_no_hold(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A billed call's in-progress comes again after Redis's window, while Postgres does not answer
    in time: the engine cannot tell whether it was resolved, so it takes no hold (a phantom would
    lock credit, hold a line, burn in the kill switch's prediction and be settled twice by a
    replayed report); it only sends the call an end-call."""
    org_id, key, number = await world.org(10_000)
    done = await world.start_call(number, "done")
    await hang_up(world, done, 60)
    await drain_org_fully(world.rt, org_id)
    world.clock.advance(world.rt.settings.idempotency_ttl_ms + 86_400_000)
    await release_call(world.rt, org_id, "pruner")  # any resolution prunes the org's expired records
    assert not await world.rt.redis.hexists(world.rt.keys.org(org_id).idem, call_state_key(org_id, "done"))
    await world.start_call(number, "real")
    real_fetchval = asyncpg.Pool.fetchval

    async def slow(pool: asyncpg.Pool, query: str, *args: Any, **kwargs: Any) -> Any:
        if "call_holds" in query:
            raise TimeoutError  # as asyncpg does past engine.db.lookup_timeout_s
        return await real_fetchval(pool, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "fetchval", slow)
    await in_progress(world, done)
    monkeypatch.undo()
    held = await wallet(world.api, key)
    assert (held["live_calls"], held["held_pence"]) == (1, 60)  # only "real"
    await world.round()
    assert world.fake.control_bodies("done") == [END]
    await world.api.vapi(payloads.end_of_call_report(done, 60))  # Vapi's report again
    await world.round()
    assert world.fake.control_bodies("real") == []  # the org's real call runs on
    assert await assert_books_agree(world.rt, org_id) == 10_000 - 60


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_hostile_messages_get_no_5xx(world: World, hostile: dict[str, Any]) -> None:
    await world.org(1_000)
    raw = orjson.dumps(hostile)
    assert (await world.api.vapi(raw)).status_code < 500
    assert (await world.api.vapi(raw, path="/api/vapi/webhook/status-check")).status_code < 500


async def test_a_call_running_unfunded_is_refused_by_the_reserve_api_and_a_late_assistant_request(world: World) -> None:
    org_id, key, number = await world.org(5)  # too little to fund a call
    out_call = running(world, "out-unfunded", number)
    await in_progress(world, out_call)
    reserved = await world.api.as_org(key, "POST", "/api/calls/out-unfunded/reserve")
    assert (reserved.status_code, reserved.json()["error"]["code"]) == (409, "call_not_funded")
    late = await world.api.vapi(payloads.assistant_request(payloads.call("out-unfunded", phone_number_id=number)))
    assert late.json() == {"error": SPOKEN_NO_CREDIT}


async def test_an_admission_replayed_after_the_window_takes_no_hold(world: World) -> None:
    """Found by the model-based test: an assistant-request replayed after Redis forgot its call
    (or a platform's reserve retried a week later) took a new hold for a finished call, which no
    expiry ever removed (Postgres has the call resolved) and which drifted from Postgres."""
    org_id, key, number = await world.org(10_000)
    done = await world.start_call(number, "done")
    await hang_up(world, done, 60)
    assert (await world.api.as_org(key, "POST", "/api/calls/api-done/reserve")).status_code == 201
    await world.api.vapi(payloads.end_of_call_report(payloads.call("api-done"), 30))
    await drain_org_fully(world.rt, org_id)
    world.clock.advance(world.rt.settings.idempotency_ttl_ms + 86_400_000)
    await release_call(world.rt, org_id, "pruner")  # any resolution prunes the org's expired records
    replayed = await world.api.vapi(payloads.assistant_request(done))
    assert set(replayed.json()) == {"error"}
    retried = await world.api.as_org(key, "POST", "/api/calls/api-done/reserve")
    assert (retried.status_code, retried.json()["error"]["code"]) == (409, "call_already_resolved")
    held = await wallet(world.api, key)
    assert (held["live_calls"], held["held_pence"]) == (0, 0)
    assert await assert_books_agree(world.rt, org_id) == 10_000 - 60 - 30
