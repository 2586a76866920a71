"""Replays and races: the same message or request delivered 1-20 times at once, in any order,
bills exactly once. Real Redis and Postgres; the deliveries run concurrently on one event loop."""

import asyncio
import random

import pytest

from credit_engine.engine.amounts import billed_seconds_from_ms, call_cost_pence
from tests.webapp.conftest import Api, api, app_settings  # noqa: F401 - fixtures
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

pytestmark = pytest.mark.faults

COPIES = [1, 2, 5, 20]


@pytest.mark.parametrize("copies", COPIES)
async def test_every_message_of_a_call_delivered_n_times_at_once_in_any_order_bills_once(api: Api, copies: int) -> None:
    org, key = await api.new_org(100_000)
    number = await api.register_number(org)
    plain = call("call-replayed", phone_number_id=number)
    admitted = call("call-replayed", phone_number_id=number, org_hint=org)
    # The admission first (Vapi waits for our answer before anything else happens), then every
    # later message n times, shuffled, all at once.
    answers = await asyncio.gather(*[api.vapi(assistant_request(plain)) for _ in range(copies)])
    assert all(a.status_code == 200 and "assistantOverrides" in a.json() for a in answers)
    later = [
        status_update(admitted, "in-progress"),
        status_update(admitted, "ended", ended_reason="customer-ended-call"),
        end_of_call_report(admitted, 125),
    ] * copies
    random.Random(copies).shuffle(later)
    responses = await asyncio.gather(*[api.vapi(body) for body in later])
    assert {r.status_code for r in responses} == {200}
    cost = call_cost_pence(billed_seconds_from_ms(125_000), 60)
    assert await ledger_kinds(api, org) == [("topup", 100_000), ("call_charge", -cost)]
    shown = await wallet(api, key)
    assert (shown["balance_pence"], shown["held_pence"], shown["live_calls"]) == (100_000 - cost, 0, 0)


@pytest.mark.parametrize("copies", COPIES)
async def test_a_late_admission_replay_after_the_report_holds_nothing(api: Api, copies: int) -> None:
    org, key = await api.new_org(100_000)
    number = await api.register_number(org)
    plain = call("call-late", phone_number_id=number)
    admitted = call("call-late", phone_number_id=number, org_hint=org)
    await api.vapi(assistant_request(plain))
    await api.vapi(end_of_call_report(admitted, 60))
    late = await asyncio.gather(*[api.vapi(assistant_request(plain)) for _ in range(copies)])
    assert {r.status_code for r in late} == {200}
    shown = await wallet(api, key)
    assert (shown["balance_pence"], shown["held_pence"], shown["live_calls"]) == (100_000 - 60, 0, 0)
    assert await ledger_kinds(api, org) == [("topup", 100_000), ("call_charge", -60)]


@pytest.mark.parametrize("copies", COPIES)
async def test_a_top_up_sent_n_times_at_once_credits_once(api: Api, copies: int) -> None:
    org, key = await api.new_org(0)
    responses = await asyncio.gather(
        *[
            api.admin(
                "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 777}, headers={"Idempotency-Key": "pay-1"}
            )
            for _ in range(copies)
        ]
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) >= 1 and set(codes) <= {201, 409}  # 409: "still running, retry"
    ids = {r.json()["transaction_id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1
    assert (await wallet(api, key))["balance_pence"] == 777
    assert await ledger_kinds(api, org) == [("topup", 777)]


@pytest.mark.parametrize("copies", COPIES)
async def test_a_provision_replayed_n_times_during_a_provider_outage_charges_and_refunds_once(
    api: Api, copies: int
) -> None:
    org, key = await api.new_org(5_000)
    request = {"area_code": "999"}  # the fake provider fails for 999
    responses = await asyncio.gather(
        *[
            api.as_org(key, "POST", "/api/managed-telephony/provision", request, headers={"Idempotency-Key": "buy-1"})
            for _ in range(copies)
        ]
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(502) >= 1 and set(codes) <= {502, 409}
    again = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", request, headers={"Idempotency-Key": "buy-1"}
    )
    assert again.status_code == 502 and again.headers["Idempotent-Replayed"] == "true"
    assert (await wallet(api, key))["balance_pence"] == 5_000
    # The refund is written to Postgres first; the charge arrives through the outbox: compare as sets.
    assert sorted(await ledger_kinds(api, org)) == [("asset", -1_000), ("refund", 1_000), ("topup", 5_000)]
