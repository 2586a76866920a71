"""The engine is the server of every call it admits (issue 13, point 1): Vapi routes a call's
messages to the assistant's server URL before the number's, so the answer to an
assistant-request overrides the call's `server`, `serverMessages`, `monitorPlan` and
`maxDurationSeconds`. Answers are checked against the SDK's response type."""

from dataclasses import replace
from typing import Any

import pydantic
import pytest
from vapi.types import AssistantOverrides, MonitorPlan, Server, ServerMessageResponseAssistantRequest

from credit_engine.engine.call_server import (
    ENGINE_SERVER_MESSAGES,
    VAPI_DEFAULT_SERVER_MESSAGES,
    WEBHOOK_PATH,
    admission_overrides,
)
from credit_engine.engine.config import ConfigError, Settings
from tests.fake_vapi_api import check_request
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

PUBLIC_URL = "https://credit.example.com"


@pytest.fixture
def app_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    extra = getattr(request, "param", {"public_url": PUBLIC_URL})
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET, **extra)


def check_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """An assistant-request answer Vapi takes: the SDK's response type, and nothing it does not know."""
    ServerMessageResponseAssistantRequest.model_validate(answer)
    overrides = answer["assistantOverrides"]
    assert check_request(AssistantOverrides, overrides) == []
    assert check_request(MonitorPlan, overrides["monitorPlan"]) == []
    if "server" in overrides:
        assert check_request(Server, overrides["server"]) == []
    return overrides  # type: ignore[no-any-return]


def vapi_routes(
    message_type: str, *, tool_url: str | None, assistant_url: str | None, number_url: str | None
) -> str | None:
    """Where Vapi sends a call's message (vapi-contract.md §1): the tool's server (tool-calls only),
    else the assistant's (as overridden for the call), else the phone number's."""
    if message_type == "tool-calls" and tool_url:
        return tool_url
    return assistant_url or number_url


async def test_an_admitted_calls_messages_come_to_the_engine_whatever_the_assistants_server(api: Api) -> None:
    org, key = await api.new_org(600)  # 10 minutes at 60p/min
    number = await api.register_number(org, assistant_id="asst-with-its-own-server")
    answer = (await api.vapi(assistant_request(call("c-1", phone_number_id=number)))).json()
    overrides = check_answer(answer)
    assert overrides["server"] == {"url": PUBLIC_URL + WEBHOOK_PATH, "headers": {"X-Vapi-Secret": WEBHOOK_SECRET}}
    assert overrides["serverMessages"] == list(VAPI_DEFAULT_SERVER_MESSAGES)  # Vapi's default, nothing removed
    assert set(ENGINE_SERVER_MESSAGES) <= set(overrides["serverMessages"])
    assert overrides["monitorPlan"] == {"controlEnabled": True}
    assert (overrides["maxDurationSeconds"], overrides["variableValues"]) == (600, {"org_id": org})
    # The saved assistant's own server would have taken the status-updates and the report; the
    # call's override names the engine, which Vapi asks before the number.
    for message_type in ("status-update", "end-of-call-report"):
        route = vapi_routes(
            message_type,
            tool_url=None,
            assistant_url=overrides["server"]["url"],
            number_url="https://platform.test/vapi",
        )
        assert route == PUBLIC_URL + WEBHOOK_PATH
    # And delivered there, the call is billed.
    the_call = call("c-1", phone_number_id=number)
    await api.vapi(status_update(the_call, "in-progress"))
    await api.vapi(end_of_call_report(the_call, 90))
    assert (await api.as_org(key, "GET", "/api/wallet")).json()["balance_pence"] == 600 - 90


@pytest.mark.parametrize("app_settings", [{"public_url": PUBLIC_URL, "vapi_credential_id": "cred-123"}], indirect=True)
async def test_with_a_vapi_credential_the_calls_server_names_it(api: Api) -> None:
    org, _ = await api.new_org(600)
    number = await api.register_number(org)
    overrides = check_answer((await api.vapi(assistant_request(call("c-2", phone_number_id=number)))).json())
    assert overrides["server"] == {"url": PUBLIC_URL + WEBHOOK_PATH, "credentialId": "cred-123"}


@pytest.mark.parametrize("app_settings", [{}], indirect=True)
async def test_without_a_public_url_the_answer_still_enables_control_and_bounds_the_call(api: Api) -> None:
    org, _ = await api.new_org(600)
    number = await api.register_number(org)
    overrides = check_answer((await api.vapi(assistant_request(call("c-3", phone_number_id=number)))).json())
    assert "server" not in overrides and "serverMessages" not in overrides
    assert overrides["monitorPlan"] == {"controlEnabled": True} and overrides["maxDurationSeconds"] == 600


def test_overrides_merge_into_what_was_asked_and_never_take_anything_away() -> None:
    settings = Settings(public_url=PUBLIC_URL, vapi_webhook_secret="s")
    asked = {
        "serverMessages": ["transcript", "tool-calls"],
        "maxDurationSeconds": 120,
        "variableValues": {"customer": "x", "org_id": "forged"},
        "monitorPlan": {"listenEnabled": True, "controlEnabled": False},
        "firstMessage": "Hello",
    }
    merged = admission_overrides(settings, "org-1", 600, asked)
    assert merged["serverMessages"] == ["transcript", "tool-calls", "status-update", "end-of-call-report"]
    assert merged["maxDurationSeconds"] == 120  # the platform's shorter limit stands
    assert admission_overrides(settings, "org-1", 60, asked)["maxDurationSeconds"] == 60  # the credit's shorter one
    assert merged["variableValues"] == {"customer": "x", "org_id": "org-1"}
    assert merged["monitorPlan"] == {"listenEnabled": True, "controlEnabled": True}
    assert merged["firstMessage"] == "Hello" and asked["serverMessages"] == ["transcript", "tool-calls"]
    AssistantOverrides.model_validate(merged)


def test_the_public_url_is_checked_when_read() -> None:
    assert Settings.from_env({"CREDIT_ENGINE_PUBLIC_URL": "https://credit.example.com/"}).public_url == PUBLIC_URL
    for bad in ("credit.example.com", "ftp://x", "https://x/?q=1"):
        with pytest.raises(ConfigError, match="CREDIT_ENGINE_PUBLIC_URL"):
            Settings.from_env({"CREDIT_ENGINE_PUBLIC_URL": bad})
    with pytest.raises(pydantic.ValidationError):  # the check helper itself catches a wrong shape
        ServerMessageResponseAssistantRequest.model_validate({"assistantOverrides": {"maxDurationSeconds": "x"}})


def test_a_platform_cannot_name_a_reservation_in_its_calls_variables(settings: Settings) -> None:
    """The reservation id a call placed through the engine carries is the engine's to set: one a
    platform put in its own answer (naming a pending reservation of its org) is dropped, so an
    inbound call can never adopt, or release, a reservation."""
    from credit_engine.engine.call_server import RESERVATION_VARIABLE, admission_overrides

    asked = {"variableValues": {RESERVATION_VARIABLE: "ce-dial-abc", "customer_name": "Ada"}}
    overrides = admission_overrides(settings, "org-1", 60, asked)
    assert overrides["variableValues"] == {"customer_name": "Ada", "org_id": "org-1"}
