# ruff: noqa: F811 - the forwarding tests' fixtures (platform, app_settings) are imported and used by name
"""Found by an adversarial review (medium): the platform's own assistant-request answer can admit a
call that the engine holds but does not bound and is not the server of (engine/call_server.py
promises: every answer that admits a call names the engine as server, keeps status-update and
end-of-call-report, enables control and bounds maxDurationSeconds).

- A `destination` answer is passed on as it is (merge_platform_answer: "transfers the call as it
  is") while the hold is kept: Vapi transfers the call at once, with no maxDurationSeconds, no
  monitorPlan.controlEnabled and no server override. The call runs as long as the far end likes,
  past the org's credit and grace, and its messages go wherever the number/account points.
- A transient squad carries its own `membersOverrides` ("applied as a global override" after each
  member's own assistantOverrides, per Vapi's CreateSquadDTO) and members' `assistantOverrides`:
  the engine adds `squadOverrides` but leaves the platform's server / serverMessages /
  maxDurationSeconds in the squad's own override layers untouched, so which one wins is up to
  Vapi's merge order; the engine's part must be in every layer (as it is written into a transient
  workflow's own body).
- A `handoff-destination-request` is relayed and the platform's answer returned verbatim: a
  handoff to a transient assistant (or one with `assistantOverrides`, "applied to the destination
  assistant") naming the platform's server, dropping status-update/end-of-call-report and with no
  bound hands the rest of the call to an assistant the engine is not the server of.

Fixed: a transient squad's every override layer and a relayed handoff destination's overrides get
the engine's part (engine/call_server.py), and the server the platform named is where the call's
messages are forwarded. Left as it is, and said in the README: a `destination` answer (the issue
asks for it to be passed on) transfers the call with no maxDurationSeconds; the kill switch bounds
it through the call's control URL.
"""

import orjson
from vapi.types import ServerMessageResponseAssistantRequest, ServerMessageResponseHandoffDestinationRequest

from credit_engine.engine.call_server import WEBHOOK_PATH
from tests.fake_platform import FakePlatform, Reply
from tests.webapp.conftest import Api
from tests.webapp.test_forwarding import PUBLIC_URL, app_settings, eventually, platform  # noqa: F401
from tests.webapp.vapi_payloads import assistant_request, call, status_update

ENGINE = PUBLIC_URL + WEBHOOK_PATH


async def test_a_transient_squads_own_overrides_cannot_take_the_call_away(api: Api, platform: FakePlatform) -> None:
    org, _ = await api.new_org(600)
    number = await api.register_number(org)
    platform_server = {"url": f"{platform.base_url}/squad"}
    squad = {
        "members": [
            {
                "assistantId": "asst-front-desk",
                "assistantOverrides": {"server": platform_server, "serverMessages": ["transcript"]},
            }
        ],
        "membersOverrides": {"server": platform_server, "serverMessages": [], "maxDurationSeconds": 43200},
    }
    platform.replies["assistant-request"] = Reply(body={"squad": squad})
    answer = (await api.vapi(assistant_request(call("c-squad", phone_number_id=number)))).json()
    ServerMessageResponseAssistantRequest.model_validate(answer)
    assert answer["squadOverrides"]["server"]["url"] == ENGINE
    layers = [answer["squad"].get("membersOverrides") or {}] + [
        m.get("assistantOverrides") or {} for m in answer["squad"]["members"]
    ]
    for layer in layers:
        assert layer.get("server", {"url": ENGINE})["url"] == ENGINE, f"an override layer names another server: {layer}"
        messages = layer.get("serverMessages")
        assert messages is None or {"status-update", "end-of-call-report"} <= set(messages), layer
        assert layer.get("maxDurationSeconds", 0) <= answer["squadOverrides"]["maxDurationSeconds"], layer


async def test_a_handoff_answer_relayed_from_the_platform_keeps_the_engine_as_server(
    api: Api, platform: FakePlatform
) -> None:
    org, _ = await api.new_org(600)
    number = await api.register_number(org)
    platform.replies["assistant-request"] = Reply(body={"assistantId": "asst-platform"})
    the_call = call("c-handoff", phone_number_id=number)
    await api.vapi(assistant_request(the_call))
    await api.vapi(status_update(the_call, "in-progress"))
    platform.replies["handoff-destination-request"] = Reply(
        body={
            "destination": {
                "type": "assistant",
                "assistant": {"name": "closer", "server": {"url": f"{platform.base_url}/elsewhere"}},
                "assistantOverrides": {"serverMessages": ["transcript"], "maxDurationSeconds": 43200},
            }
        }
    )
    request = {
        "message": {
            "type": "handoff-destination-request",
            "call": the_call.model_dump(mode="json", by_alias=True, exclude_none=True),
            "parameters": {},
        }
    }
    answer = (await api.vapi(orjson.dumps(request))).json()
    ServerMessageResponseHandoffDestinationRequest.model_validate(answer)
    destination = answer.get("destination", {})
    overrides = destination.get("assistantOverrides") or {}
    assert (overrides.get("server") or {}).get("url") == ENGINE and {"status-update", "end-of-call-report"} <= set(
        overrides.get("serverMessages") or []
    ), f"the handoff gives the rest of the call to an assistant the engine is not the server of: {destination}"
    assert destination["assistant"] == {"name": "closer", "server": {"url": f"{platform.base_url}/elsewhere"}}
    # The rest of the call's messages go to the server the handoff named.
    await api.vapi(status_update(the_call, "ended"))
    await eventually(lambda: platform.types("/elsewhere") == ["status-update"])
