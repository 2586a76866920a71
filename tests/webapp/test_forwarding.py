"""The engine in front of the platform's own server (issue 13, points 2, 3 and 6): the platform's
assistant-request logic composed with the engine's (the platform's answer comes back with the
engine's overrides merged in), and every message of the call forwarded, with the same body and
Vapi-style auth: answers relayed, the rest in the background. Over real HTTP: Vapi's messages
built with its SDK to the real app, a fake platform server on loopback, real Redis and Postgres."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from vapi.types import (
    CreateWorkflowDto,
    ServerMessageResponseAssistantRequest,
    ServerMessageToolCalls,
    ServerMessageToolCallsToolWithToolCallListItem_Function,
    ToolCall,
    ToolCallFunction,
)

from credit_engine.engine.call_server import WEBHOOK_PATH, workflows_answered
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp.vapi import SPOKEN_TRY_LATER
from tests.fake_platform import FakePlatform, Reply, fake_platform_server
from tests.fake_vapi_api import API_KEY, FakeVapiApi
from tests.helpers import engine_served
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api
from tests.webapp.test_seed_scenarios import wallet
from tests.webapp.vapi_payloads import assistant_request, call, encode, end_of_call_report, status_update

PUBLIC_URL = "https://credit.example.com"
PLATFORM_SECRET = "platform-secret-" + "p" * 20


@pytest.fixture
async def platform() -> AsyncIterator[FakePlatform]:
    async with fake_platform_server() as server:
        yield server


@pytest.fixture
def app_settings(
    settings: Settings, platform: FakePlatform, vapi_api: FakeVapiApi, request: pytest.FixtureRequest
) -> Settings:
    chosen = {
        "forward_url": f"{platform.base_url}/vapi",
        "outbound_allow_private": True,  # the fake platform listens on 127.0.0.1
        **getattr(request, "param", {}),
    }
    return replace(
        settings,
        admin_token=ADMIN_TOKEN,
        vapi_webhook_secret=WEBHOOK_SECRET,
        public_url=PUBLIC_URL,
        forward_secret=PLATFORM_SECRET,
        vapi_api_key=API_KEY,
        vapi_base_url=vapi_api.base_url,
        **chosen,
    )


async def eventually(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def tool_calls(call_id: str, number: str) -> bytes:
    the_call = call(call_id, phone_number_id=number)
    tool = ToolCall(
        id="tc-1", type="function", function=ToolCallFunction(name="lookup_order", arguments='{"order": "42"}')
    )
    with_list = ServerMessageToolCallsToolWithToolCallListItem_Function(type="function", tool_call=tool)
    return encode(
        ServerMessageToolCalls(
            type="tool-calls", call=the_call, tool_call_list=[tool], tool_with_tool_call_list=[with_list]
        )
    )


TRANSIENT = {
    "name": "Per-call assistant",
    "firstMessage": "Hello from the platform",
    "server": {"url": "PLATFORM/calls"},
    "serverMessages": ["transcript", "tool-calls"],
}


async def test_a_transient_assistant_is_answered_with_the_engine_as_server_and_its_messages_reach_both(
    api: Api, platform: FakePlatform
) -> None:
    org, key = await api.new_org(600)
    number = await api.register_number(org)
    transient = {**TRANSIENT, "server": {"url": f"{platform.base_url}/calls"}}
    platform.replies["assistant-request"] = Reply(
        body={"assistant": transient, "assistantOverrides": {"maxDurationSeconds": 300}}
    )
    platform.replies["tool-calls"] = Reply(body={"results": [{"toolCallId": "tc-1", "result": "order 42 shipped"}]})
    answer = (await api.vapi(assistant_request(call("c-1", phone_number_id=number)))).json()
    ServerMessageResponseAssistantRequest.model_validate(answer)
    assert answer["assistant"] == transient  # the platform's choice, untouched
    overrides = answer["assistantOverrides"]
    assert overrides["server"]["url"] == PUBLIC_URL + WEBHOOK_PATH  # the engine, not the assistant's own server
    assert overrides["serverMessages"] == ["transcript", "tool-calls", "status-update", "end-of-call-report"]
    assert (overrides["maxDurationSeconds"], overrides["monitorPlan"]) == (300, {"controlEnabled": True})
    # Vapi's own body and auth, as Vapi would have sent them to the platform.
    (asked,) = [g for g in platform.got if g.path == "/vapi"]
    assert asked.message["type"] == "assistant-request" and asked.headers["x-vapi-secret"] == PLATFORM_SECRET
    # The call's messages now come to the engine: billed here, and forwarded to the server the
    # platform's answer named (the tool's answer relayed back to Vapi).
    the_call = call("c-1", phone_number_id=number)
    assert (await api.vapi(status_update(the_call, "in-progress"))).json() == {}
    relayed = await api.vapi(tool_calls("c-1", number))
    assert relayed.json() == {"results": [{"toolCallId": "tc-1", "result": "order 42 shipped"}]}
    await api.vapi(end_of_call_report(the_call, 61))
    await eventually(lambda: platform.types("/calls") == ["status-update", "tool-calls", "end-of-call-report"])
    assert (await wallet(api, key))["balance_pence"] == 600 - 61  # billed once, whatever the platform did


async def test_the_platforms_refusal_is_passed_on_and_the_hold_released(api: Api, platform: FakePlatform) -> None:
    org, key = await api.new_org(600)
    number = await api.register_number(org)
    platform.replies["assistant-request"] = Reply(body={"error": "We are closed today."})
    answer = (await api.vapi(assistant_request(call("c-closed", phone_number_id=number)))).json()
    assert answer == {"error": "We are closed today."}
    held = await wallet(api, key)
    assert (held["held_pence"], held["live_calls"], held["balance_pence"]) == (0, 0, 600)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(delay_s=10),  # slow: past the 5 s budget
        Reply(status=500),
        Reply(raw=b"<html>oops</html>"),
        Reply(body=[1, 2]),
        Reply(body={}),  # chooses nothing
        Reply(body={"error": ""}),  # an empty error: Vapi would say "Unknown Error"
    ],
    ids=["slow", "500", "not-json", "not-an-object", "nothing", "empty-error"],
)
async def test_a_platform_slow_down_or_answering_garbage_gets_the_spoken_try_later(
    api: Api, platform: FakePlatform, reply: Reply
) -> None:
    org, key = await api.new_org(600)
    number = await api.register_number(org)
    platform.replies["assistant-request"] = reply
    started = time.monotonic()
    answer = await api.vapi(assistant_request(call("c-bad", phone_number_id=number)))
    assert time.monotonic() - started < 5.5  # inside the assistant-request budget (Vapi allows 7.5 s)
    assert (answer.status_code, answer.json()) == (200, {"error": SPOKEN_TRY_LATER})
    assert (await wallet(api, key))["held_pence"] == 0


async def test_squad_and_workflow_answers(api: Api, platform: FakePlatform, rt: Runtime) -> None:
    org, _ = await api.new_org(600)
    number = await api.register_number(org)
    platform.replies["assistant-request"] = Reply(
        body={"squadId": "squad-1", "squadOverrides": {"variableValues": {"x": 1}}}
    )
    squad = (await api.vapi(assistant_request(call("c-squad", phone_number_id=number)))).json()
    ServerMessageResponseAssistantRequest.model_validate(squad)
    assert squad["squadId"] == "squad-1"
    assert squad["squadOverrides"]["server"]["url"] == PUBLIC_URL + WEBHOOK_PATH
    assert squad["squadOverrides"]["variableValues"] == {"x": 1, "org_id": org}
    platform.replies["assistant-request"] = Reply(body={"workflowId": "wf-1"})
    workflow = (await api.vapi(assistant_request(call("c-wf", phone_number_id=number)))).json()
    ServerMessageResponseAssistantRequest.model_validate(workflow)
    # Vapi's workflowOverrides carry variables only: the workflow's server is the engine by its own
    # configuration, and `vapi check` checks the workflows platforms answered with.
    assert workflow == {"workflowId": "wf-1", "workflowOverrides": {"variableValues": {"org_id": org}}}
    assert "wf-1" in await workflows_answered(rt, 10)


async def test_a_transient_workflow_is_answered_with_the_engine_as_its_server_and_its_messages_reach_both(
    api: Api, platform: FakePlatform
) -> None:
    """A transient workflow is the engine's answer to write: its own server becomes the engine's,
    control enabled, its duration bounded by the credit; the server it named gets the messages."""
    org, key = await api.new_org(300)  # 5 minutes at 60p a minute
    number = await api.register_number(org)
    transient = {
        "name": "Per-call workflow",
        "nodes": [],
        "edges": [],
        "server": {"url": f"{platform.base_url}/flows", "timeoutSeconds": 15},
        "maxDurationSeconds": 3600,
        "monitorPlan": {"listenEnabled": True},
    }
    platform.replies["assistant-request"] = Reply(body={"workflow": transient})
    answer = (await api.vapi(assistant_request(call("c-flow", phone_number_id=number)))).json()
    ServerMessageResponseAssistantRequest.model_validate(answer)
    CreateWorkflowDto.model_validate(answer["workflow"])
    assert answer["workflow"]["server"]["url"] == PUBLIC_URL + WEBHOOK_PATH
    assert answer["workflow"]["monitorPlan"] == {"listenEnabled": True, "controlEnabled": True}
    assert answer["workflow"]["maxDurationSeconds"] <= 300
    assert answer["workflowOverrides"] == {"variableValues": {"org_id": org}}
    the_call = call("c-flow", phone_number_id=number)
    await api.vapi(status_update(the_call, "in-progress"))
    await api.vapi(end_of_call_report(the_call, 45))
    await eventually(lambda: platform.types("/flows") == ["status-update", "end-of-call-report"])
    assert (await wallet(api, key))["balance_pence"] == 300 - 45


async def test_a_forward_url_that_leads_back_to_the_engine_stops_at_the_first_hop(
    app_settings: Settings, platform: FakePlatform
) -> None:
    """The operator's forward URL names the engine under another name than its public URL (here
    its loopback address), and what the engine forwards authenticates there: the forward secret
    is the webhook secret. The environment refuses that pairing (tests/regressions/
    test_forward_secret_is_the_webhook_secret.py), so this is the belt to those braces (a proxy
    that authenticates on the engine's behalf would do the same): each message comes back once,
    is answered without being handled or forwarded again, and the call is billed once."""
    port = free_port()
    engine_again = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    settings = replace(app_settings, forward_url=engine_again, forward_secret=WEBHOOK_SECRET)
    async with engine_served(settings, port), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        api = Api(client, settings)
        org, key = await api.new_org(600)
        number = await api.register_number(org)
        assert (await api.as_org(key, "POST", "/api/calls/c-loop/reserve")).status_code == 201  # an outbound call
        the_call = call("c-loop", phone_number_id=number)
        await api.vapi(status_update(the_call, "in-progress"))
        assert (await api.vapi(tool_calls("c-loop", number))).json() == {}  # relayed to the engine: nothing to say
        await api.vapi(end_of_call_report(the_call, 61))

        async def came_back() -> float:
            metrics = (await client.get("/metrics")).text
            lines = [
                line
                for line in metrics.splitlines()
                if line.startswith("credit_engine_vapi_messages_total") and 'result="forwarded_back"' in line
            ]
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

        deadline = time.monotonic() + 5
        while await came_back() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a loop would go on counting
        assert await came_back() == 3  # status-update, tool-calls, report: each came back once
        assert (await wallet(api, key))["balance_pence"] == 600 - 61
        # An assistant-request forwarded to the engine comes back and is refused: the platform it
        # was meant for never saw it. The hold is released.
        answer = (await api.vapi(assistant_request(call("c-loop-2", phone_number_id=number)))).json()
        assert answer == {"error": SPOKEN_TRY_LATER}
        assert (await wallet(api, key))["held_pence"] == 0
        assert await came_back() == 4
    assert platform.got == []


async def test_forwarding_to_a_platform_that_is_down_neither_delays_vapi_nor_changes_billing(
    api: Api, platform: FakePlatform
) -> None:
    org, key = await api.new_org(600)
    number = await api.register_number(org, assistant_id="asst-saved")
    platform.replies["assistant-request"] = Reply(body={"assistantId": "asst-saved"})
    assert (await api.vapi(assistant_request(call("c-down", phone_number_id=number)))).json()[
        "assistantId"
    ] == "asst-saved"
    platform.down = True
    platform.replies["conversation-update"] = Reply(delay_s=3)
    the_call = call("c-down", phone_number_id=number)
    for body in (
        status_update(the_call, "in-progress"),
        b'{"message":{"type":"conversation-update","call":{"id":"c-down","phoneNumberId":"' + number.encode() + b'"}}}',
        end_of_call_report(the_call, 42),
    ):
        started = time.monotonic()
        assert (await api.vapi(body)).json() == {}
        assert time.monotonic() - started < 1.0  # Vapi's 200 does not wait for the platform
    assert (await wallet(api, key))["balance_pence"] == 600 - 42
    # Each message was tried, and tried again (the platform answered 503).
    await eventually(lambda: platform.types().count("end-of-call-report") >= 2)
    metrics = (await api.client.get("/metrics")).text
    assert 'credit_engine_forwarded_messages_total{result="retried"}' in metrics


@pytest.mark.parametrize("app_settings", [{"forward_url": None}], indirect=True)
async def test_without_a_forward_url_messages_go_to_the_saved_assistants_own_server(
    api: Api, platform: FakePlatform, vapi_api: FakeVapiApi
) -> None:
    """Where the platform's server was before the engine stood in front of it: the saved
    assistant's own server URL, as Vapi has it (GET /assistant/{id}, cached)."""
    org, key = await api.new_org(600)
    vapi_api.add_assistant("asst-own", server_url=f"{platform.base_url}/own")
    number = await api.register_number(org, assistant_id="asst-own")
    answer = (await api.vapi(assistant_request(call("c-own", phone_number_id=number)))).json()
    assert (
        answer["assistantId"] == "asst-own"
        and answer["assistantOverrides"]["server"]["url"] == PUBLIC_URL + WEBHOOK_PATH
    )
    the_call = call("c-own", phone_number_id=number).model_copy(update={"assistant_id": "asst-own"})
    await api.vapi(status_update(the_call, "in-progress"))
    await api.vapi(end_of_call_report(the_call, 30))
    # Both wait on the one lookup at Vapi, then go out from two senders at once: in either order
    # (background forwarding does not promise a call's order; README, "Known limits").
    await eventually(lambda: sorted(platform.types("/own")) == ["end-of-call-report", "status-update"])
    assert platform.got[0].headers["x-vapi-secret"] == PLATFORM_SECRET
    assert len([s for s in vapi_api.seen if s.path == "/assistant/asst-own"]) == 1  # cached
    assert (await wallet(api, key))["balance_pence"] == 600 - 30


async def test_an_orgs_own_forward_url_and_refusal_sentence_win_over_the_deployments(
    api: Api, platform: FakePlatform
) -> None:
    org, org_key = await api.new_org(
        600, forward_url=f"{platform.base_url}/org-own", refusal_try_later="Our agents are away, call back soon."
    )
    other, _ = await api.new_org(600)
    platform.replies["assistant-request"] = Reply(body={"assistantId": "asst-platform"})
    mine = await api.register_number(org)
    theirs = await api.register_number(other)
    assert (await api.vapi(assistant_request(call("c-own-1", phone_number_id=mine)))).json()[
        "assistantId"
    ] == "asst-platform"
    assert (await api.vapi(assistant_request(call("c-dep-1", phone_number_id=theirs)))).json()[
        "assistantId"
    ] == "asst-platform"
    assert (platform.types("/org-own"), platform.types("/vapi")) == (["assistant-request"], ["assistant-request"])
    # The org's platform gets the org's own secret (which the org reads from the API), never the
    # deployment's, which the operator's platform trusts.
    own_secret = (await api.as_org(org_key, "GET", "/api/forwarding/secret")).json()["secret"]
    (to_org,) = [g for g in platform.got if g.path == "/org-own"]
    (to_operator,) = [g for g in platform.got if g.path == "/vapi"]
    assert (to_org.headers["x-vapi-secret"], to_operator.headers["x-vapi-secret"]) == (own_secret, PLATFORM_SECRET)
    # The org's platform failing: its own sentence, the hold released.
    platform.replies["assistant-request"] = Reply(status=500)
    answer = (await api.vapi(assistant_request(call("c-own-2", phone_number_id=mine)))).json()
    assert answer == {"error": "Our agents are away, call back soon."}
    answer = (await api.vapi(assistant_request(call("c-dep-2", phone_number_id=theirs)))).json()
    assert answer == {"error": SPOKEN_TRY_LATER}


@pytest.mark.parametrize("app_settings", [{"outbound_allow_private": False}], indirect=True)
async def test_only_the_operators_forward_url_may_be_an_internal_address(
    api: Api, platform: FakePlatform, rt: Runtime
) -> None:
    """CREDIT_ENGINE_FORWARD_URL is the operator's (the platform's server beside the engine, here on
    loopback). An org's forward_url that resolves inside by the time it is used (a DNS answer
    changed since it was saved: written here straight to Postgres) reaches nothing."""
    org, key = await api.new_org(600)
    number = await api.register_number(org)
    platform.replies["assistant-request"] = Reply(body={"assistantId": "asst-platform"})
    assert (await api.vapi(assistant_request(call("c-op", phone_number_id=number)))).json()[
        "assistantId"
    ] == "asst-platform"
    the_call = call("c-op", phone_number_id=number)
    await api.vapi(status_update(the_call, "in-progress"))
    await api.vapi(end_of_call_report(the_call, 20))
    await eventually(lambda: platform.types("/vapi") == ["assistant-request", "status-update", "end-of-call-report"])
    sneaky, sneaky_key = await api.new_org(600)
    await rt.pg.execute("UPDATE orgs SET forward_url = $2 WHERE org_id = $1", sneaky, f"{platform.base_url}/inside")
    sneaky_number = await api.register_number(sneaky)
    answer = (await api.vapi(assistant_request(call("c-in", phone_number_id=sneaky_number)))).json()
    assert answer == {"error": SPOKEN_TRY_LATER}
    assert platform.types("/inside") == []
    assert (await wallet(api, sneaky_key))["held_pence"] == 0
