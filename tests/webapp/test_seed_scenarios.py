"""The seed's ten end-to-end scenarios (prepaid-billing-e2e.test.ts), over HTTP against real Redis
and Postgres, with Vapi payloads built from Vapi's SDK types."""

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.outbox import drain_org_fully
from tests.webapp.conftest import Api
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update


async def ledger_kinds(api: Api, org_id: str) -> list[tuple[str, int]]:
    from credit_engine.engine.runtime import Runtime

    rt = await Runtime.open(api.settings)
    try:
        await drain_org_fully(rt, org_id)
        rows = await rt.pg.fetch("SELECT kind, amount_pence FROM ledger_entries WHERE org_id = $1 ORDER BY id", org_id)
    finally:
        await rt.close()
    return [(row["kind"], row["amount_pence"]) for row in rows]


async def wallet(api: Api, key: str) -> dict[str, int]:
    response = await api.as_org(key, "GET", "/api/wallet")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


# Phase 1: atomic asset billing


async def test_1_provision_is_refused_when_the_balance_is_short(api: Api) -> None:
    org, key = await api.new_org(999)  # a number costs 1000p
    response = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", {"area_code": "415"}, headers={"Idempotency-Key": "buy-1"}
    )
    assert response.status_code == 402
    error = response.json()["error"]
    assert (error["code"], error["required_pence"], error["available_pence"]) == ("insufficient_balance", 1000, 999)
    assert (await wallet(api, key))["balance_pence"] == 999
    assert await ledger_kinds(api, org) == [("topup", 999)]  # nothing charged


async def test_2_provision_charges_the_servers_price_and_registers_the_number(api: Api) -> None:
    org, key = await api.new_org(2500)
    pricing = await api.as_org(key, "GET", "/api/managed-telephony/pricing")
    assert pricing.json()["phone_number_pence"] == 1000
    response = await api.as_org(
        key,
        "POST",
        "/api/managed-telephony/provision",
        {"area_code": "415", "assistant_id": "asst-9"},
        headers={"Idempotency-Key": "buy-1"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["charged_pence"], body["balance_pence"]) == (1000, 1500)
    assert body["phone_number"]["number"].startswith("+1415")
    assert await ledger_kinds(api, org) == [("topup", 2500), ("asset", -1000)]
    # The number is the org's now: an inbound call to it finds the org and its assistant.
    answer = await api.vapi(assistant_request(call("call-x", phone_number_id=body["phone_number"]["id"])))
    assert answer.json()["assistantId"] == "asst-9"


async def test_3_a_replayed_provision_is_charged_once(api: Api) -> None:
    org, key = await api.new_org(5000)
    request = {"area_code": "212"}
    first = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", request, headers={"Idempotency-Key": "buy-1"}
    )
    second = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", request, headers={"Idempotency-Key": "buy-1"}
    )
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    other = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", {"area_code": "646"}, headers={"Idempotency-Key": "buy-1"}
    )
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert (await wallet(api, key))["balance_pence"] == 4000
    assert await ledger_kinds(api, org) == [("topup", 5000), ("asset", -1000)]


# Phase 2: credit reservation


async def test_4_reservation_lifecycle(api: Api, clock: ManualClock) -> None:
    org, key = await api.new_org(10_000)
    number = await api.register_number(org)
    the_call = call("call-4", phone_number_id=number, control_url="https://vapi.test/control/4")
    answer = await api.vapi(assistant_request(the_call))
    assert answer.status_code == 200
    overrides = {
        "maxDurationSeconds": 10_000,
        "variableValues": {"org_id": org},
        "monitorPlan": {"controlEnabled": True},
    }
    assert answer.json() == {"assistantId": "asst-1", "assistantOverrides": overrides}  # no public URL: no server
    held = await wallet(api, key)
    assert (held["held_pence"], held["available_pence"], held["live_calls"]) == (300, 9_700, 1)
    assert (await api.vapi(status_update(the_call, "in-progress"))).json() == {}
    clock.advance(42_000)
    assert (await api.vapi(status_update(the_call, "ended", "customer-ended-call"))).json() == {}
    assert (await api.vapi(end_of_call_report(the_call, 42.3))).json() == {}
    done = await wallet(api, key)
    assert (done["balance_pence"], done["held_pence"], done["live_calls"]) == (10_000 - 43, 0, 0)
    shown = await api.as_org(key, "GET", "/api/calls/call-4")
    assert shown.json() | {} == {"call_id": "call-4", "status": "committed", "charged_pence": 43, "billed_seconds": 43}


async def test_5_commit_releases_the_unused_credit(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    the_call = call("call-5", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    assert (await wallet(api, key))["available_pence"] == 700
    await api.vapi(end_of_call_report(the_call, 30))
    after = await wallet(api, key)
    assert (after["balance_pence"], after["held_pence"], after["available_pence"]) == (970, 0, 970)


async def test_6_a_duplicate_commit_is_charged_once(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    the_call = call("call-6", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    for _ in range(3):
        assert (await api.vapi(end_of_call_report(the_call, 90))).status_code == 200
    assert (await wallet(api, key))["balance_pence"] == 910
    assert await ledger_kinds(api, org) == [("topup", 1000), ("call_charge", -90)]


# Phase 3: kill switch


async def test_7_the_kill_switch_fires_when_credit_runs_out(api: Api, clock: ManualClock) -> None:
    org, key = await api.new_org(120, rate_pence_per_minute=60)  # two minutes of calling
    number = await api.register_number(org)
    the_call = call("call-7", phone_number_id=number)
    answer = await api.vapi(assistant_request(the_call))
    assert answer.json()["assistantOverrides"]["maxDurationSeconds"] == 120
    await api.vapi(status_update(the_call, "in-progress"))
    clock.advance(119_000)
    assert (await api.status_check("call-7")).json()["endCall"] is False
    clock.advance(1_000)
    decision = (await api.status_check("call-7")).json()
    assert (decision["endCall"], decision["reason"], decision["call_cost_so_far_pence"]) == (
        True,
        "credit_exhausted",
        120,
    )


async def test_8_the_kill_switch_stays_off_while_credit_remains(api: Api, clock: ManualClock) -> None:
    org, _ = await api.new_org(100_000)
    number = await api.register_number(org)
    the_call = call("call-8", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    await api.vapi(status_update(the_call, "in-progress"))
    for _ in range(12):  # an hour, checked every five minutes: the hold is extended as it goes
        clock.advance(300_000)
        decision = (await api.status_check("call-8")).json()
        assert (decision["endCall"], decision["reason"]) == (False, "ok")


async def test_9_the_status_response_carries_the_balance(api: Api, clock: ManualClock) -> None:
    org, _ = await api.new_org(5_000)
    number = await api.register_number(org)
    the_call = call("call-9", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    await api.vapi(status_update(the_call, "in-progress"))
    clock.advance(61_000)
    decision = (await api.status_check("call-9")).json()
    assert decision == {
        "endCall": False,
        "reason": "ok",
        "balance_pence": 5_000,
        "available_pence": 4_700,
        "call_cost_so_far_pence": 61,
    }


async def test_10_transaction_history(api: Api) -> None:
    org, key = await api.new_org(10_000)
    number = await api.register_number(org)
    await api.as_org(key, "POST", "/api/managed-telephony/provision", {}, headers={"Idempotency-Key": "p1"})
    for i in range(3):
        the_call = call(f"call-10-{i}", phone_number_id=number)
        await api.vapi(assistant_request(the_call))
        await api.vapi(end_of_call_report(the_call, 60 * (i + 1)))
    await ledger_kinds(api, org)  # let the worker's job run: drain the outbox
    first = (await api.as_org(key, "GET", "/api/wallet/transactions?limit=2")).json()
    assert [(i["kind"], i["amount_pence"]) for i in first["items"]] == [("call_charge", -180), ("call_charge", -120)]
    assert first["items"][0]["balance_after_pence"] == 10_000 - 1000 - 60 - 120 - 180
    assert first["items"][0]["call_id"] == "call-10-2"
    second = (await api.as_org(key, "GET", f"/api/wallet/transactions?limit=2&cursor={first['next_cursor']}")).json()
    assert [(i["kind"], i["amount_pence"]) for i in second["items"]] == [("call_charge", -60), ("asset", -1000)]
    third = (await api.as_org(key, "GET", f"/api/wallet/transactions?limit=2&cursor={second['next_cursor']}")).json()
    assert [(i["kind"], i["amount_pence"], i["idempotency_key"]) for i in third["items"]] == [
        ("topup", 10_000, f"topup/seed-{org}")
    ]
    assert third["next_cursor"] is None
