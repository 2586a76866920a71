"""Buying a number at Vapi through the provision API: the number is bought bare, so that every
inbound call to it sends an assistant-request (and passes the credit check); the engine keeps the
assistant the org asked for and answers it. Against a fake of Vapi's API that checks each request
body against the SDK's `CreateVapiPhoneNumberDto`."""

from dataclasses import replace

import pytest

from credit_engine.engine.config import Settings
from tests.fake_vapi_api import API_KEY, FakeVapiApi
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api
from tests.webapp.test_seed_scenarios import wallet
from tests.webapp.vapi_payloads import assistant_request, call


@pytest.fixture
def app_settings(settings: Settings, vapi_api: FakeVapiApi) -> Settings:
    return replace(
        settings,
        admin_token=ADMIN_TOKEN,
        vapi_webhook_secret=WEBHOOK_SECRET,
        vapi_api_key=API_KEY,
        vapi_base_url=vapi_api.base_url,
    )


async def test_a_number_bought_with_an_assistant_is_bare_at_vapi_and_its_calls_are_credit_checked(
    api: Api, vapi_api: FakeVapiApi
) -> None:
    org, key = await api.new_org(5_000)
    bought = await api.as_org(
        key,
        "POST",
        "/api/managed-telephony/provision",
        {"area_code": "415", "assistant_id": "asst-42"},
        headers={"Idempotency-Key": "buy-1"},
    )
    assert bought.status_code == 201, bought.text
    number_id = bought.json()["phone_number"]["id"]
    (request,) = [seen for seen in vapi_api.seen if seen.method == "POST"]
    assert vapi_api.invalid == []  # Vapi would accept the body
    assert not {"assistantId", "squadId", "workflowId"} & set(request.body)  # bare: assistant-requests come to us
    # The engine answers the number's assistant-request with the assistant the org chose, after the credit check.
    answer = (await api.vapi(assistant_request(call("c-1", phone_number_id=number_id)))).json()
    assert answer["assistantId"] == "asst-42"
    assert (await wallet(api, key))["live_calls"] == 1
