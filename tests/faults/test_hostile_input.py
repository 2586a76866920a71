"""Hostile input: ids built to escape their org's hash tag or to inject SQL, and a fuzz of the Vapi
webhook parser. Each gets a clear 4xx naming the field, or Vapi's documented 200, and nothing changes."""

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credit_engine.engine.errors import InvalidInput
from credit_engine.webapp.vapi_messages import parse_message
from tests.webapp.conftest import Api, api, app_settings  # noqa: F401 - fixtures
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet

pytestmark = pytest.mark.faults

HOSTILE_IDS = [
    "a}b",
    "{org:victim}",
    "x:y",
    "victim}:holds",
    "1' OR '1'='1",
    "a; DROP TABLE ledger_entries; --",
    "ünïcödé",
    "😀",
    "a b",
    "a\nb",
    "a\x00b",
    "",
    "x" * 200,
    "../../etc",
    "*",
    "a%00",
]


@pytest.mark.parametrize("org_id", HOSTILE_IDS)
async def test_a_hostile_org_id_is_a_422_naming_it(api: Api, org_id: str) -> None:
    created = await api.admin("POST", "/api/admin/orgs", {"org_id": org_id, "name": "X", "rate_pence_per_minute": 1})
    assert created.status_code == 422, created.text
    assert created.json()["error"]["field"] == "org_id"


@pytest.mark.parametrize("call_id", [i for i in HOSTILE_IDS if i not in ("x:y",)])  # ':' is legal in a Vapi call id
async def test_a_hostile_call_id_changes_nothing(api: Api, call_id: str) -> None:
    org, key = await api.new_org(10_000)
    number = await api.register_number(org)
    reserved = await api.as_org(key, "POST", f"/api/calls/{quote(call_id, safe='')}/reserve")
    assert reserved.status_code in (404, 405, 422), reserved.text  # a path that cannot even route is a 404/405
    if reserved.status_code == 422:
        assert reserved.json()["error"]["field"] == "call_id"
    message = {"message": {"type": "assistant-request", "call": {"id": call_id, "phoneNumberId": number}}}
    answer = await api.client.post(
        "/api/vapi/webhook",
        content=json.dumps(message).encode(),
        headers={"X-Vapi-Secret": api.settings.vapi_webhook_secret or "", "Content-Type": "application/json"},
    )
    assert answer.status_code == 200 and set(answer.json()) <= {"error"}  # refused, in Vapi's shape
    report = {
        "message": {
            "type": "end-of-call-report",
            "call": {"id": call_id, "phoneNumberId": number},
            "startedAt": "2026-11-24T12:00:00Z",
            "endedAt": "2026-11-24T12:10:00Z",
        }
    }
    answer = await api.client.post(
        "/api/vapi/webhook",
        content=json.dumps(report).encode(),
        headers={"X-Vapi-Secret": api.settings.vapi_webhook_secret or "", "Content-Type": "application/json"},
    )
    assert (answer.status_code, answer.json()) == (200, {})
    shown = await wallet(api, key)
    assert (shown["balance_pence"], shown["held_pence"]) == (10_000, 0)
    assert await ledger_kinds(api, org) == [("topup", 10_000)]


async def test_a_call_id_with_a_colon_stays_inside_its_org(api: Api) -> None:
    victim, victim_key = await api.new_org(10_000)
    attacker, attacker_key = await api.new_org(10_000)
    # A call id that spells another org's key must land in the attacker's own hash tag.
    reserved = await api.as_org(attacker_key, "POST", f"/api/calls/{{org:{victim}}}:x/reserve")
    assert reserved.status_code in (404, 422)
    sneaky = await api.as_org(attacker_key, "POST", f"/api/calls/org:{victim}:holds/reserve")
    assert sneaky.status_code == 201, sneaky.text
    assert (await wallet(api, victim_key))["held_pence"] == 0
    assert (await wallet(api, attacker_key))["held_pence"] > 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
MESSAGE_TYPES = st.sampled_from(["assistant-request", "status-update", "end-of-call-report", "tool-calls", "x"])
FIELDS = st.sampled_from(
    [
        "call",
        "type",
        "status",
        "startedAt",
        "endedAt",
        "durationSeconds",
        "cost",
        "phoneNumber",
        "timestamp",
        "endedReason",
        "artifact",
    ]
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(envelope=JSON, message=st.dictionaries(FIELDS, JSON, max_size=8), message_type=MESSAGE_TYPES)
def test_the_webhook_parser_answers_any_json_with_a_message_or_invalid_input(
    envelope: object, message: dict[str, object], message_type: str
) -> None:
    for candidate in (envelope, {"message": message}, {"message": {**message, "type": message_type}}):
        try:
            parsed = parse_message(candidate)
        except InvalidInput as error:
            assert error.field
            continue
        assert isinstance(parsed.type, str)
        assert parsed.billed_seconds is None or 0 <= parsed.billed_seconds <= 10**7
