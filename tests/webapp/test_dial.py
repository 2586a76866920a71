"""Outbound calls through the engine (POST /api/calls, engine/dial.py), over HTTP against real
Redis and Postgres and a fake of Vapi's REST API that checks the POST /call body against the
SDK's `calls.create` request: the call is reserved, placed with the engine as its server, adopted
under Vapi's call id, ended by the kill switch and billed once; and every way it can go wrong
(short of credit, at the limit, Vapi refusing, failing or hanging, a replay, a crash between
Vapi's answer and the adoption, another org's number) places no unpaid call."""

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from vapi.types import Call

from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.call_server import WEBHOOK_PATH
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.holds import live_holds, remembered_resolution
from credit_engine.engine.idempotency import dial_record_key, dial_reservation_id
from credit_engine.engine.killswitch import run_round
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp import dial as dial_endpoint
from credit_engine.webapp.app import create_app
from tests.fake_vapi import FakeVapi, fake_vapi_server
from tests.fake_vapi_api import API_KEY, FakeVapiApi
from tests.webapp import vapi_payloads as payloads
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api
from tests.webapp.test_kill_switch import END, KILL_SETTINGS, RATE, SAY
from tests.webapp.test_seed_scenarios import wallet

PUBLIC_URL = "https://credit.example.com"


@pytest.fixture
async def control() -> AsyncIterator[FakeVapi]:
    """Where the kill switch's end-calls go (Vapi's control URLs, routed to a fake)."""
    async with fake_vapi_server() as server:
        yield server


@pytest.fixture
def app_settings(settings: Settings, vapi_api: FakeVapiApi) -> Settings:
    return replace(
        settings,
        admin_token=ADMIN_TOKEN,
        vapi_webhook_secret=WEBHOOK_SECRET,
        vapi_api_key=API_KEY,
        vapi_base_url=vapi_api.base_url,
        public_url=PUBLIC_URL,
        **KILL_SETTINGS,
    )


@pytest.fixture
async def worker_rt(app_settings: Settings, clock: ManualClock, control: FakeVapi) -> AsyncIterator[Runtime]:
    runtime = await Runtime.open(replace(app_settings, vapi_control_base_url=control.base_url), clock=clock)
    yield runtime
    await runtime.close()


async def new_org(api: Api, balance_pence: int, **settings: Any) -> tuple[str, str, str]:
    org_id, key = await api.new_org(
        balance_pence,
        rate_pence_per_minute=RATE,
        min_start_pence=10,
        hold_block_minutes=1,
        grace_seconds=5,
        **settings,
    )
    return org_id, key, await api.register_number(org_id)


def call_request(number: str, **extra: Any) -> dict[str, Any]:
    return {"phone_number_id": number, "customer": {"number": "+15557654321"}, "assistant_id": "asst-1", **extra}


async def place(api: Api, key: str, body: dict[str, Any], idempotency_key: str = "call-1") -> httpx.Response:
    return await api.as_org(key, "POST", "/api/calls", body, headers={"Idempotency-Key": idempotency_key})


def placed_at_vapi(vapi_api: FakeVapiApi) -> list[Any]:
    return vapi_api.seen_where("POST", "/call")


def vapi_call(vapi_api: FakeVapiApi, call_id: str) -> Call:
    """The call as Vapi's messages carry it (its overrides echoed)."""
    return Call.model_validate(vapi_api.calls[call_id])


async def place_and_die_before_adoption(api: Api, key: str, number: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The web process dies between Vapi's answer and adopting its call id."""

    async def dies(*args: Any) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr("credit_engine.engine.dial.adopt", dies)
    with pytest.raises(RuntimeError):
        await place(api, key, call_request(number))
    monkeypatch.undo()


async def call_entries(worker_rt: Runtime, org_id: str, call_id: str) -> list[tuple[str, int]]:
    await drain_org_fully(worker_rt, org_id)
    rows = await worker_rt.pg.fetch(
        "SELECT kind, amount_pence FROM ledger_entries WHERE org_id = $1 AND call_id = $2 ORDER BY id", org_id, call_id
    )
    return [(row["kind"], row["amount_pence"]) for row in rows]


async def test_a_placed_call_has_the_engine_as_its_server_is_ended_by_the_kill_switch_and_billed_once(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime, control: FakeVapi, clock: ManualClock
) -> None:
    org_id, key, number = await new_org(api, 90)  # 90 p at 1 p/s: 90 s
    t0_ms = clock.value_ms
    placed = await place(api, key, call_request(number, name="Renewal reminder"))
    assert placed.status_code == 201, placed.text
    answer = placed.json()
    call_id = answer["call_id"]
    assert answer == {"call_id": call_id, "hold_pence": 60, "max_duration_seconds": 90, "status": "queued"}
    [sent] = placed_at_vapi(vapi_api)
    assert vapi_api.invalid == []  # Vapi's SDK takes the body as it is
    overrides = sent.body["assistantOverrides"]
    assert sent.body["phoneNumberId"] == number and sent.body["assistantId"] == "asst-1"
    assert sent.body["customer"] == {"number": "+15557654321"} and sent.body["name"] == "Renewal reminder"
    assert overrides["server"] == {"url": PUBLIC_URL + WEBHOOK_PATH, "headers": {"X-Vapi-Secret": WEBHOOK_SECRET}}
    assert {"status-update", "end-of-call-report"} <= set(overrides["serverMessages"])
    assert overrides["monitorPlan"] == {"controlEnabled": True}
    assert overrides["maxDurationSeconds"] == 90  # what the credit funds
    assert overrides["variableValues"] == {
        "org_id": org_id,
        "credit_engine_reservation_id": dial_reservation_id(org_id, "call-1"),
    }
    assert list(await live_holds(worker_rt, org_id)) == [call_id]  # held under Vapi's id

    the_call = vapi_call(vapi_api, call_id)
    assert (await api.vapi(payloads.status_update(the_call, "in-progress"))).json() == {}
    async with httpx.AsyncClient() as http:
        clock.advance(t0_ms + 80_000 - clock.value_ms)
        assert (await run_round(worker_rt, http, ControlUrls(worker_rt))).warned == 1
        clock.advance(t0_ms + 95_000 - clock.value_ms)  # past depletion + grace
        assert (await run_round(worker_rt, http, ControlUrls(worker_rt))).ended == 1
    assert control.control_bodies(call_id) == [SAY, END]

    report = payloads.end_of_call_report(the_call, 95)
    for _ in range(2):  # Vapi may send it twice
        assert (await api.vapi(report)).json() == {}
    assert await call_entries(worker_rt, org_id, call_id) == [("call_charge", -90)]  # 95 s, to the floor
    after = await wallet(api, key)
    assert (after["balance_pence"], after["held_pence"], after["debt_pence"], after["live_calls"]) == (0, 0, 5, 0)


async def test_short_of_credit_is_402_with_nothing_reserved_and_no_call_placed(api: Api, vapi_api: FakeVapiApi) -> None:
    _, key, number = await new_org(api, 5)  # below min_start_pence
    refused = await place(api, key, call_request(number))
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "insufficient_balance"
    assert placed_at_vapi(vapi_api) == []
    assert (await wallet(api, key))["held_pence"] == 0
    # Nothing was spent: the same key works after a top-up.
    org_id = (await wallet(api, key))["org_id"]
    await api.admin("POST", f"/api/admin/orgs/{org_id}/topups", {"amount_pence": 100}, {"Idempotency-Key": "t"})
    assert (await place(api, key, call_request(number))).status_code == 201


async def test_at_the_concurrency_limit_is_429_and_no_call_placed(api: Api, vapi_api: FakeVapiApi) -> None:
    _, key, number = await new_org(api, 1_000, max_concurrent_calls=1)
    assert (await place(api, key, call_request(number), "a")).status_code == 201
    refused = await place(api, key, call_request(number), "b")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_calls"
    assert len(placed_at_vapi(vapi_api)) == 1


@pytest.mark.parametrize(("mode", "vapi_status"), [("refuse", 400), ("fail", 500)])
async def test_vapi_refusing_or_failing_is_502_with_the_hold_released_once(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime, mode: str, vapi_status: int
) -> None:
    org_id, key, number = await new_org(api, 1_000)
    vapi_api.call_mode = mode
    failed = await place(api, key, call_request(number))
    assert failed.status_code == 502, failed.text
    error = failed.json()["error"]
    assert error["code"] == "vapi_refused" and error["vapi_status"] == vapi_status
    assert f"Vapi answered {vapi_status}" in error["message"]
    if mode == "refuse":
        assert "E.164" in error["message"]  # Vapi's own reason
    after = await wallet(api, key)
    assert (after["balance_pence"], after["held_pence"], after["live_calls"]) == (1_000, 0, 0)
    reservation_id = dial_reservation_id(org_id, "call-1")
    state = await remembered_resolution(worker_rt, org_id, reservation_id)
    assert state is not None and (state.status.value, state.charged_pence) == ("released", 0)
    replayed = await place(api, key, call_request(number))
    assert (replayed.status_code, replayed.json()) == (502, failed.json())
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert len(placed_at_vapi(vapi_api)) == 1
    await drain_org_fully(worker_rt, org_id)
    rows = await worker_rt.pg.fetch("SELECT status, charged_pence FROM call_holds WHERE org_id = $1", org_id)
    assert [(r["status"], r["charged_pence"]) for r in rows] == [("released", 0)]  # one release, nothing charged
    assert await call_entries(worker_rt, org_id, reservation_id) == []


async def test_a_replay_returns_the_first_answer_and_places_no_second_call(api: Api, vapi_api: FakeVapiApi) -> None:
    _, key, number = await new_org(api, 1_000)
    first = await place(api, key, call_request(number))
    again = await place(api, key, call_request(number))
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert len(placed_at_vapi(vapi_api)) == 1
    assert (await wallet(api, key))["live_calls"] == 1
    other = await place(api, key, call_request(number, name="other"))
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_a_crash_after_vapi_answered_leaves_the_call_billed_and_killable(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web process dies between Vapi's answer and adopting its call id: the call's first
    message finds the hold by the reservation id it carries; a retry of the key never places a
    second call."""
    org_id, key, number = await new_org(api, 1_000)
    await place_and_die_before_adoption(api, key, number, monkeypatch)
    [call_id] = vapi_api.calls
    reservation_id = dial_reservation_id(org_id, "call-1")
    assert list(await live_holds(worker_rt, org_id)) == [reservation_id]  # held, not yet under Vapi's id
    # A retry now: the claim kept "no answer" before Vapi was asked (Redis's dial record alone
    # could be lost with Redis): 504, the hold kept, and no second call.
    early = await place(api, key, call_request(number))
    assert (early.status_code, early.json()["error"]["code"]) == (504, "vapi_no_answer"), early.text

    the_call = vapi_call(vapi_api, call_id)
    assert (await api.vapi(payloads.status_update(the_call, "in-progress"))).json() == {}
    assert list(await live_holds(worker_rt, org_id)) == [call_id]  # adopted by the webhook
    assert (await wallet(api, key))["live_calls"] == 1
    checked = (await api.status_check(call_id)).json()
    assert checked["endCall"] is False and checked["reason"] == "ok"  # the kill switch knows it

    await worker_rt.pg.execute(  # the claim goes stale, as it would after CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S
        "UPDATE idempotent_requests SET created_at = created_at - interval '1 hour' WHERE org_id = $1", org_id
    )
    retried = await place(api, key, call_request(number))  # once adopted, the call is the answer
    assert retried.status_code == 201, retried.text
    assert retried.json()["call_id"] == call_id and retried.json()["hold_pence"] == 60
    assert len(placed_at_vapi(vapi_api)) == 1  # never a second call

    assert (await api.vapi(payloads.end_of_call_report(the_call, 30))).json() == {}
    assert await call_entries(worker_rt, org_id, call_id) == [("call_charge", -30)]
    assert await call_entries(worker_rt, org_id, reservation_id) == []


async def test_a_report_before_the_adoption_bills_the_call_and_frees_the_reservation(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that never reached in-progress (no answer) reports before anything adopted it."""
    org_id, key, number = await new_org(api, 1_000)

    async def dies(*args: Any) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr("credit_engine.engine.dial.adopt", dies)
    with pytest.raises(RuntimeError):
        await place(api, key, call_request(number))
    [call_id] = vapi_api.calls
    the_call = vapi_call(vapi_api, call_id)
    assert (await api.vapi(payloads.end_of_call_report(the_call, 12))).json() == {}
    after = await wallet(api, key)
    assert (after["balance_pence"], after["held_pence"], after["live_calls"]) == (988, 0, 0)
    assert await call_entries(worker_rt, org_id, call_id) == [("call_charge", -12)]


async def test_vapi_not_answering_keeps_the_hold_and_the_call_if_placed_is_adopted(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown whether Vapi placed it: the hold is kept (not released blindly), the key answers
    504 for good (no second call), and the call's first message adopts the hold."""
    org_id, key, number = await new_org(api, 1_000)
    monkeypatch.setattr(dial_endpoint, "create_call_timeout_s", 0.3)
    vapi_api.call_mode, vapi_api.hang_s = "hang", 2.0
    unknown = await place(api, key, call_request(number))
    assert unknown.status_code == 504, unknown.text
    reservation_id = dial_reservation_id(org_id, "call-1")
    assert unknown.json()["error"]["code"] == "vapi_no_answer"
    assert unknown.json()["error"]["reservation_id"] == reservation_id
    assert list(await live_holds(worker_rt, org_id)) == [reservation_id]
    assert (await wallet(api, key))["held_pence"] == 60
    again = await place(api, key, call_request(number))
    assert (again.status_code, again.json()) == (504, unknown.json())
    assert len(placed_at_vapi(vapi_api)) == 1

    [call_id] = vapi_api.calls  # Vapi did place it
    the_call = vapi_call(vapi_api, call_id)
    assert (await api.vapi(payloads.status_update(the_call, "ringing"))).json() == {}
    assert list(await live_holds(worker_rt, org_id)) == [call_id]
    assert (await api.vapi(payloads.status_update(the_call, "in-progress"))).json() == {}
    assert (await api.vapi(payloads.end_of_call_report(the_call, 20))).json() == {}
    assert await call_entries(worker_rt, org_id, call_id) == [("call_charge", -20)]
    assert (await wallet(api, key))["held_pence"] == 0


async def test_another_orgs_number_is_404_and_nothing_is_placed(api: Api, vapi_api: FakeVapiApi) -> None:
    _, key, _ = await new_org(api, 1_000)
    _, _, theirs = await new_org(api, 1_000)
    for number in (theirs, "pn-nobody"):
        refused = await place(api, key, call_request(number))
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["field"] == "phone_number_id"
    assert placed_at_vapi(vapi_api) == []
    assert (await wallet(api, key))["held_pence"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customer": {"number": "+15557654321"}, "assistant_id": "a"}, "phone_number_id"),
        ({"phone_number_id": "pn-1", "assistant_id": "a"}, "customer"),
        ({"phone_number_id": "pn-1", "customer": {"number": "555-1234"}, "assistant_id": "a"}, "customer.number"),
        ({"phone_number_id": "pn-1", "customer": {"number": "+15557654321"}}, "assistant_id"),
        (
            {"phone_number_id": "pn-1", "customer": {"number": "+15557654321"}, "assistant_id": "a", "assistant": {}},
            "assistant_id",
        ),
        (
            {"phone_number_id": "pn-1", "customer": {"number": "+15557654321"}, "assistant_id": "a", "to": "x"},
            "to",
        ),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(
    api: Api, vapi_api: FakeVapiApi, body: dict[str, Any], field: str
) -> None:
    _, key, _ = await new_org(api, 1_000)
    refused = await place(api, key, body)
    assert 400 <= refused.status_code < 500, refused.text
    assert refused.json()["error"]["field"] == field
    assert placed_at_vapi(vapi_api) == []


async def test_no_idempotency_key_is_400(api: Api) -> None:
    _, key, number = await new_org(api, 1_000)
    refused = await api.as_org(key, "POST", "/api/calls", call_request(number))
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "Idempotency-Key"


async def test_the_reserve_api_refuses_an_id_the_engine_reserves_placed_calls_under(api: Api) -> None:
    org_id, key, _ = await new_org(api, 1_000)
    refused = await api.as_org(key, "POST", f"/api/calls/{dial_reservation_id(org_id, 'k')}/reserve")
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "call_id"


async def test_a_transient_assistants_server_gets_the_calls_messages_from_the_engine(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime
) -> None:
    """The platform's own server (a transient assistant's) is not where Vapi sends the call's
    messages any more: the engine is, and it forwards them there."""
    _, key, number = await new_org(api, 1_000)
    platform_url = "https://platform.example/vapi"
    assistant = {"name": "Sales", "server": {"url": platform_url}, "serverMessages": ["tool-calls"]}
    body = {"phone_number_id": number, "customer": {"number": "+15557654321"}, "assistant": assistant}
    placed = await place(api, key, body)
    assert placed.status_code == 201, placed.text
    [sent] = placed_at_vapi(vapi_api)
    assert vapi_api.invalid == []
    assert sent.body["assistant"] == assistant and "assistantId" not in sent.body
    overrides = sent.body["assistantOverrides"]
    assert overrides["server"]["url"] == PUBLIC_URL + WEBHOOK_PATH
    assert overrides["serverMessages"] == ["tool-calls", "status-update", "end-of-call-report"]
    assert await CallIndex(worker_rt).forward_url_of(placed.json()["call_id"]) == platform_url


async def test_a_retry_after_redis_lost_the_dial_record_places_no_second_call(
    api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after Vapi answered, Redis then loses the dial record (a restart, a rebuild
    from Postgres), and the claim goes stale: the retry replays what Postgres kept before Vapi was
    asked, and never asks again."""
    org_id, key, number = await new_org(api, 1_000)
    await place_and_die_before_adoption(api, key, number, monkeypatch)
    reservation_id = dial_reservation_id(org_id, "call-1")
    idem = worker_rt.keys.org(org_id).idem
    assert await worker_rt.redis.hdel(idem, dial_record_key(org_id, reservation_id)) == 1  # lost with Redis
    await worker_rt.pg.execute(
        "UPDATE idempotent_requests SET created_at = created_at - interval '1 hour' WHERE org_id = $1", org_id
    )
    for _ in range(2):
        retried = await place(api, key, call_request(number))
        assert (retried.status_code, retried.json()["error"]["code"]) == (504, "vapi_no_answer"), retried.text
    assert len(placed_at_vapi(vapi_api)) == 1


async def test_a_gateway_error_keeps_the_hold_as_no_answer(api: Api, vapi_api: FakeVapiApi, worker_rt: Runtime) -> None:
    """502, 503, 504 from in front of Vapi do not say no call was placed: the hold stays (the call's
    first message adopts it; unplaced, it expires at no charge) and the answer is 504."""
    org_id, key, number = await new_org(api, 1_000)
    vapi_api.failing["POST /call"] = 503
    answered = await place(api, key, call_request(number))
    assert (answered.status_code, answered.json()["error"]["code"]) == (504, "vapi_no_answer"), answered.text
    assert list(await live_holds(worker_rt, org_id)) == [dial_reservation_id(org_id, "call-1")]


async def test_a_body_postgres_cannot_keep_is_refused_before_anything_is_reserved(
    api: Api, vapi_api: FakeVapiApi
) -> None:
    """A NUL character (jsonb refuses it) or nesting past orjson's writer: 400, not 500."""
    _, key, number = await new_org(api, 1_000)
    customer = {"number": "+15557654321", "name": "a\u0000b"}
    nested: Any = "deep"
    for _ in range(300):
        nested = {"n": nested}
    bodies = [
        call_request(number, customer=customer),
        call_request(number, assistant_overrides={"variableValues": nested}),
    ]
    for body in bodies:
        refused = await place(api, key, body)
        assert 400 <= refused.status_code < 500 and "error" in refused.json(), refused.text
    assert placed_at_vapi(vapi_api) == []
    assert (await wallet(api, key))["held_pence"] == 0


async def test_without_a_public_url_no_call_is_placed(
    app_settings: Settings, clock: ManualClock, vapi_api: FakeVapiApi
) -> None:
    """A call that does not name the engine as its server would report elsewhere: nothing would
    start its clock, end it or bill it as it runs. 503 until CREDIT_ENGINE_PUBLIC_URL is set."""
    app = create_app(replace(app_settings, public_url=None), clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credit-engine.test") as client:
            api = Api(client, replace(app_settings, public_url=None))
            _, key, number = await new_org(api, 1_000)
            answered = await place(api, key, call_request(number))
    assert (answered.status_code, answered.json()["error"]["code"]) == (503, "public_url_not_configured")
    assert placed_at_vapi(vapi_api) == []
