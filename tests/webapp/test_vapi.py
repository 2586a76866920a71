"""Vapi's webhook as Vapi uses it: every documented reply, duplicates, reordering, strangers."""

import asyncio

import pytest
from vapi.types import Analysis, Artifact, ServerMessageEndOfCallReport

from credit_engine.engine.clock import ManualClock
from credit_engine.webapp.vapi import SPOKEN_BUSY, SPOKEN_NO_CREDIT, SPOKEN_NOT_SET_UP
from tests.webapp.conftest import Api
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet
from tests.webapp.vapi_payloads import T0, assistant_request, call, encode, end_of_call_report, status_update


async def test_assistant_request_refused_with_a_spoken_error_when_credit_is_short(api: Api) -> None:
    org, key = await api.new_org(59)  # less than one minute at 60p/min
    number = await api.register_number(org)
    answer = await api.vapi(assistant_request(call("c1", phone_number_id=number)))
    assert (answer.status_code, answer.json()) == (200, {"error": SPOKEN_NO_CREDIT})
    assert (await wallet(api, key))["held_pence"] == 0


async def test_assistant_request_for_an_unknown_number_is_refused_and_charges_nobody(api: Api) -> None:
    answer = await api.vapi(assistant_request(call("c1", phone_number_id="pn-nobody-knows")))
    assert (answer.status_code, answer.json()) == (200, {"error": SPOKEN_NOT_SET_UP})
    assert answer.json()["error"]  # never an empty error: Vapi would say "Unknown Error"


async def test_assistant_request_falls_back_to_the_phone_number_object_but_never_to_variable_values(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org, assistant_id="asst-77")
    # call.phoneNumberId missing, message.phoneNumber.id present.
    body = assistant_request(call("c1")).replace(
        b'"type":"assistant-request"', b'"type":"assistant-request","phoneNumber":{"id":"' + number.encode() + b'"}'
    )
    assert (await api.vapi(body)).json()["assistantId"] == "asst-77"
    # No number: the org named in the call's variableValues admitted nothing, so it pays nothing.
    the_call = call("c2", org_hint=org).model_copy(update={"assistant_id": "asst-88"})
    assert (await api.vapi(assistant_request(the_call))).json() == {"error": SPOKEN_NOT_SET_UP}
    assert (await wallet(api, key))["live_calls"] == 1


async def test_fifty_identical_assistant_requests_at_once_make_one_hold(api: Api) -> None:
    org, key = await api.new_org(10_000)
    number = await api.register_number(org)
    body = assistant_request(call("same-call", phone_number_id=number))
    answers = await asyncio.gather(*[api.vapi(body) for _ in range(50)])
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1  # every one of them got the same answer
    held = await wallet(api, key)
    assert (held["held_pence"], held["live_calls"]) == (300, 1)


async def test_too_many_concurrent_calls_is_refused_with_a_spoken_error(api: Api) -> None:
    org, _ = await api.new_org(10_000, max_concurrent_calls=1)
    number = await api.register_number(org)
    assert "assistantId" in (await api.vapi(assistant_request(call("c1", phone_number_id=number)))).json()
    assert (await api.vapi(assistant_request(call("c2", phone_number_id=number)))).json() == {"error": SPOKEN_BUSY}


async def test_a_report_before_the_ended_status_and_a_report_twice_bill_once(api: Api, clock: ManualClock) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    the_call = call("c1", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    await api.vapi(status_update(the_call, "in-progress"))
    await api.vapi(end_of_call_report(the_call, 61))
    await api.vapi(status_update(the_call, "ended"))  # late
    await api.vapi(status_update(the_call, "in-progress"))  # very late, reordered
    await api.vapi(end_of_call_report(the_call, 61))  # again
    after = await wallet(api, key)
    assert (after["balance_pence"], after["held_pence"], after["live_calls"]) == (1000 - 61, 0, 0)
    assert await ledger_kinds(api, org) == [("topup", 1000), ("call_charge", -61)]


async def test_an_outbound_call_is_reserved_on_first_sight_and_billed(api: Api, clock: ManualClock) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    the_call = call("out-1", phone_number_id=number, call_type="outboundPhoneCall")
    assert (await api.vapi(status_update(the_call, "in-progress"))).json() == {}
    live = await wallet(api, key)
    assert (live["held_pence"], live["live_calls"]) == (300, 1)
    clock.advance(10_000)
    assert (await api.status_check("out-1")).json()["call_cost_so_far_pence"] == 10
    await api.vapi(end_of_call_report(the_call, 10, at_message_level=False))  # times only on call.*
    assert (await wallet(api, key))["balance_pence"] == 990


async def test_a_report_for_a_call_never_reserved_is_billed_directly(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    await api.vapi(end_of_call_report(call("lost-request", phone_number_id=number), 120))
    assert (await wallet(api, key))["balance_pence"] == 880


async def test_a_report_for_an_unknown_org_is_acknowledged_and_charges_nobody(api: Api) -> None:
    org, key = await api.new_org(1000)
    answer = await api.vapi(end_of_call_report(call("c1", phone_number_id="pn-unknown"), 300))
    assert (answer.status_code, answer.json()) == (200, {})
    assert (await wallet(api, key))["balance_pence"] == 1000


async def test_vapis_cost_is_stored_not_billed(api: Api) -> None:
    org, _ = await api.new_org(1000)
    number = await api.register_number(org)
    await api.vapi(end_of_call_report(call("c1", phone_number_id=number), 60, cost_usd=9.99))
    from credit_engine.engine.runtime import Runtime

    rt = await Runtime.open(api.settings)
    try:
        await ledger_kinds(api, org)
        row = await rt.pg.fetchrow(
            "SELECT amount_pence, meta FROM ledger_entries WHERE kind = 'call_charge' AND org_id = $1", org
        )
    finally:
        await rt.close()
    assert row["amount_pence"] == -60  # 60 s at 60p/min, whatever Vapi's own cost was
    assert row["meta"]["vapi_cost_usd"] == 9.99


async def test_other_message_types_get_an_empty_acknowledgement(api: Api) -> None:
    for body in (
        b'{"message":{"type":"conversation-update","call":{"id":"c1"}}}',
        b'{"message":{"type":"speech-update","status":"started","role":"user"}}',
        b'{"message":{"type":"hang"}}',
        b'{"message":{"type":"something-vapi-adds-next-year"}}',
    ):
        answer = await api.vapi(body)
        assert (answer.status_code, answer.json()) == (200, {})


async def test_malformed_bodies_get_a_400_naming_the_problem(api: Api) -> None:
    broken = await api.vapi(b'{"message": {"type": "assistant-request",')
    assert (broken.status_code, broken.json()["error"]["code"]) == (400, "invalid_json")
    for body, field in (
        (b'{"hello": 1}', "message"),
        (b'{"message": {"call": {}}}', "message.type"),
        (b"[1,2]", "message"),
    ):
        answer = await api.vapi(body)
        assert answer.status_code == 400
        assert answer.json()["error"]["field"] == field


async def test_wrong_types_inside_a_message_are_ignored_not_fatal(api: Api) -> None:
    org, _ = await api.new_org(1000)
    number = await api.register_number(org)
    body = encode(call("c1", phone_number_id=number)).replace(b'{"message":', b"", 1)[:-1]
    weird = (
        b'{"message":{"type":"end-of-call-report","startedAt":12,"endedAt":["x"],"cost":"free",'
        b'"call":' + body + b',"durationSeconds":"long"}}'
    )
    answer = await api.vapi(weird)
    assert (answer.status_code, answer.json()) == (200, {})


async def test_a_stuck_assistant_request_is_refused_aloud_within_the_budget(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from credit_engine.webapp import vapi as vapi_module

    org, _ = await api.new_org(1000)
    number = await api.register_number(org)

    async def stuck(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(vapi_module, "assistant_request_budget_s", 0.5)
    monkeypatch.setattr(vapi_module, "reserve_call", stuck)
    started = time.monotonic()
    answer = await api.vapi(assistant_request(call("c1", phone_number_id=number)))
    assert (answer.status_code, answer.json()) == (200, {"error": vapi_module.SPOKEN_TRY_LATER})
    assert time.monotonic() - started < 2


async def test_a_report_without_times_bills_what_we_saw_and_a_later_full_report_settles(
    api: Api, clock: ManualClock
) -> None:
    org, key = await api.new_org(10_000)
    number = await api.register_number(org)
    the_call = call("c1", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    await api.vapi(status_update(the_call, "in-progress"))
    clock.advance(600_000)
    await api.vapi(status_update(the_call, "ended"))
    bare = (
        b'{"message":{"type":"end-of-call-report","endedReason":"customer-ended-call","call":{"id":"c1","phoneNumberId":"'
        + number.encode()
        + b'"}}}'
    )
    assert (await api.vapi(bare)).json() == {}
    assert (await wallet(api, key))["balance_pence"] == 10_000 - 600  # the ten minutes we saw, not 0
    await api.vapi(end_of_call_report(the_call, 612))  # the full report, later
    assert (await wallet(api, key))["balance_pence"] == 10_000 - 612
    assert await ledger_kinds(api, org) == [("topup", 10_000), ("call_charge", -600), ("call_adjustment", -12)]


async def test_another_org_cannot_take_over_a_calls_status_checks(api: Api, clock: ManualClock) -> None:
    victim, victim_key = await api.new_org(5000)
    number = await api.register_number(victim)
    await api.vapi(assistant_request(call("victim-call", phone_number_id=number)))
    _, attacker_key = await api.new_org(777)
    taken = await api.as_org(attacker_key, "POST", "/api/calls/victim-call/reserve")
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "call_taken")
    assert (await wallet(api, attacker_key))["held_pence"] == 0
    decision = (await api.status_check("victim-call")).json()
    assert decision["balance_pence"] == 5000  # still the victim's call, not the attacker's hold


async def test_a_status_check_naming_an_org_that_does_not_exist_is_an_unknown_call(api: Api) -> None:
    body = b'{"message":{"type":"status-update","call":{"id":"c-x","assistantOverrides":{"variableValues":{"org_id":"ghost"}}}}}'
    answer = await api.vapi(body, path="/api/vapi/webhook/status-check")
    assert (answer.status_code, answer.json()["reason"]) == (200, "unknown_call")


async def test_a_status_check_while_postgres_has_the_org_but_redis_cannot_take_it_back_says_retry(api: Api) -> None:
    """Redis lost the org's hash while its outbox still holds entries the ledger has not taken:
    the org cannot be restored until they drain (restore_conflict). A status check then answers
    503 state_restoring, so the caller asks again; never "unknown_call", which a caller may take
    as "not a call of ours, stop asking" (found by review: the restore seam had made it so)."""
    from credit_engine.engine.keys import Keyspace
    from tests.conftest import connect_any

    org, _ = await api.new_org(5000)
    number = await api.register_number(org)
    await api.vapi(assistant_request(call("c-kept", phone_number_id=number)))  # its hold is in the outbox
    assert api.settings.redis_url is not None
    redis = await connect_any(api.settings.redis_url)
    try:
        keys = Keyspace(api.settings.key_prefix).org(org)
        assert await redis.xlen(keys.outbox) > 0
        await redis.delete(keys.org)
        answer = await api.status_check("c-kept")
        assert (answer.status_code, answer.json()["error"]["code"]) == (503, "state_restoring"), answer.text
    finally:
        await redis.aclose()


async def test_a_refused_assistant_request_does_not_leave_its_hold_behind(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from credit_engine.webapp import vapi as vapi_module

    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    real_reserve = vapi_module.reserve_call

    async def slow_after_reserving(*args: object, **kwargs: object) -> object:
        result = await real_reserve(*args, **kwargs)  # type: ignore[arg-type]
        await asyncio.sleep(60)  # the hold is taken, then the deadline passes
        return result

    monkeypatch.setattr(vapi_module, "assistant_request_budget_s", 0.3)
    monkeypatch.setattr(vapi_module, "reserve_call", slow_after_reserving)
    answer = await api.vapi(assistant_request(call("c1", phone_number_id=number)))
    assert answer.json() == {"error": vapi_module.SPOKEN_TRY_LATER}
    for _ in range(100):
        if (await wallet(api, key))["held_pence"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await wallet(api, key))["held_pence"] == 0


async def test_seconds_are_billed_from_the_timestamps_in_integers(api: Api) -> None:
    """256.001 s is 257 started seconds (a float of seconds made it 255.99999 and lost one)."""
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    await api.vapi(end_of_call_report(call("c-256", phone_number_id=number), 256.001))
    assert (await wallet(api, key))["balance_pence"] == 1000 - 257


async def test_a_report_with_an_end_and_no_start_bills_what_the_engine_saw(api: Api, clock: ManualClock) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    the_call = call("c-no-start", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    await api.vapi(status_update(the_call, "in-progress"))
    clock.advance(30_000)
    await api.vapi(status_update(the_call, "ended"))
    ended_only = the_call.model_copy(update={"ended_at": T0})
    body = encode(
        ServerMessageEndOfCallReport(
            type="end-of-call-report",
            ended_reason="customer-ended-call",
            call=ended_only,
            artifact=Artifact(),
            analysis=Analysis(),
            ended_at=T0,
        )
    )
    assert (await api.vapi(body)).json() == {}
    assert (await wallet(api, key))["balance_pence"] == 1000 - 30  # the 30 s the engine saw, not 0


async def test_a_lone_surrogate_anywhere_is_a_4xx_never_a_500(api: Api) -> None:
    org, _ = await api.new_org(1000)
    number = await api.register_number(org)
    bodies = [
        b'{"message":{"type":"status-update","call":{"id":"c1","phoneNumberId":"\\ud800"}}}',
        b'{"message":{"type":"status-update","call":{"id":"c1","phoneNumberId":"' + number.encode() + b'",'
        b'"assistantOverrides":{"variableValues":{"org_id":"\\udfff"}}}}}',
        b'{"call_id":"\\ud800"}',
        b'{"call_id":"c1","x":"\\ud83d"}',
    ]
    for body in bodies:
        for path in ("/api/vapi/webhook/status-check", "/api/vapi/webhook"):
            answer = await api.vapi(body, path=path)
            assert 400 <= answer.status_code < 500, (path, body, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "invalid_json"
