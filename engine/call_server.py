"""Making the engine the server of every call it admits (Vapi's routing, vapi-contract.md §1).

Vapi sends a call's messages to the first server URL it finds: the tool's (tool-calls only), the
assistant's, the phone number's, the account's. A platform's saved assistant usually has its own
`server.url`, and then the call's status-updates and end-of-call-report go there, never to the
engine: the call's clock never starts, the kill switch never learns its control URL, and its hold
expires charging nothing. So every answer that admits a call overrides, for that call only:

- `server`: `CREDIT_ENGINE_PUBLIC_URL` + the webhook path, authenticated as configured: a Vapi
  credential (`CREDIT_ENGINE_VAPI_CREDENTIAL_ID`) or the webhook secret as the `X-Vapi-Secret`
  header Vapi then sends back;
- `serverMessages`: what the assistant asked for (Vapi's default list when the engine does not
  know it), plus `status-update` and `end-of-call-report`; never fewer;
- `monitorPlan.controlEnabled: true` (the kill switch needs `call.monitor.controlUrl`);
- `maxDurationSeconds`: the smaller of what was asked and what the org's credit funds;
- `variableValues.org_id`: the org that admitted the call (merged into what was asked).

Without `CREDIT_ENGINE_PUBLIC_URL` the engine cannot name itself: everything but `server` and
`serverMessages` is still set, and `up` and `verify` say that calls may bypass the engine.
"""

from dataclasses import dataclass
from typing import Any

from credit_engine.engine import limits
from credit_engine.engine.config import Settings
from credit_engine.engine.runtime import Runtime

WEBHOOK_PATH = "/api/vapi/webhook"
STATUS_CHECK_PATH = "/api/vapi/webhook/status-check"
ENGINE_SERVER_MESSAGES = ("status-update", "end-of-call-report")
# What Vapi sends when an assistant names no list (CreateAssistantDTO.serverMessages' default).
VAPI_DEFAULT_SERVER_MESSAGES = (
    "conversation-update",
    "end-of-call-report",
    "function-call",
    "hang",
    "speech-update",
    "status-update",
    "tool-calls",
    "transfer-destination-request",
    "handoff-destination-request",
    "user-interrupted",
    "assistant.started",
)


# The variable a call placed through the engine carries to name its hold (engine/dial.py): the
# engine's to set, never a platform's (one naming a pending reservation would release it).
RESERVATION_VARIABLE = "credit_engine_reservation_id"


def engine_variables(asked: object, org_id: str) -> dict[str, Any]:
    """The call's variableValues: what the platform asked, with the engine's org_id, and without a
    reservation id it did not set."""
    variables = {k: v for k, v in asked.items() if k != RESERVATION_VARIABLE} if isinstance(asked, dict) else {}
    return {**variables, "org_id": org_id}


def engine_server(settings: Settings) -> dict[str, Any] | None:
    """Vapi's `Server` object naming the engine's webhook; None without a public URL."""
    if settings.public_url is None:
        return None
    server: dict[str, Any] = {"url": settings.public_url + WEBHOOK_PATH}
    if settings.vapi_credential_id is not None:
        server["credentialId"] = settings.vapi_credential_id
    elif settings.vapi_webhook_secret is not None:
        server["headers"] = {"X-Vapi-Secret": settings.vapi_webhook_secret}
    return server


def admission_overrides(
    settings: Settings,
    org_id: str,
    funded_duration_s: int | None,
    asked: dict[str, Any] | None = None,
    assistant_server_messages: list[str] | None = None,
) -> dict[str, Any]:
    """The `assistantOverrides` (or `squadOverrides`) of an answer that admits a call: `asked`
    (what the platform's own answer overrode, if anything) with the engine's part merged in.
    funded_duration_s None (a handoff mid-call): a maxDurationSeconds asked for stays as asked
    (the kill switch bounds the call)."""
    assert funded_duration_s is None or limits.max_duration_s_min <= funded_duration_s <= limits.max_duration_s_max
    overrides = dict(asked or {})
    if funded_duration_s is not None:
        overrides["maxDurationSeconds"] = _shorter(overrides.get("maxDurationSeconds"), funded_duration_s)
    overrides["variableValues"] = engine_variables(overrides.get("variableValues"), org_id)
    monitor = overrides.get("monitorPlan")
    overrides["monitorPlan"] = {**(monitor if isinstance(monitor, dict) else {}), "controlEnabled": True}
    server = engine_server(settings)
    if server is not None:
        overrides["server"] = server
        overrides["serverMessages"] = _with_engines(overrides.get("serverMessages") or assistant_server_messages)
    return overrides


def _shorter(asked: Any, funded_duration_s: int) -> int:
    if isinstance(asked, int) and not isinstance(asked, bool) and limits.max_duration_s_min <= asked:
        return min(asked, funded_duration_s)
    return funded_duration_s


def _with_engines(asked: Any) -> list[str]:
    """The messages asked for (Vapi's default list if none), with the engine's added; none removed."""
    wanted = [m for m in asked if isinstance(m, str)] if isinstance(asked, list) else list(VAPI_DEFAULT_SERVER_MESSAGES)
    return wanted + [m for m in ENGINE_SERVER_MESSAGES if m not in wanted]


@dataclass(frozen=True)
class PlatformAnswer:
    """The platform's own answer to an assistant-request, made the engine's."""

    answer: dict[str, Any] | None  # what Vapi gets; None: the platform's answer was not usable
    refusal: str | None  # the platform's own spoken error (the call is refused)
    server_url: str | None  # the server URL the answer named for the call (its messages are forwarded there)
    workflow_id: str | None = None  # a saved workflow: its own server must be the engine (`vapi check`)


# The keys of an assistant-request answer (the SDK's ServerMessageResponseAssistantRequest), by
# what they choose; each choice takes the overrides of its own kind.
CHOICES = (
    (("assistantId", "assistant"), "assistantOverrides"),
    (("squadId", "squad"), "squadOverrides"),
    (("workflowId", "workflow"), "workflowOverrides"),
)


def merge_platform_answer(
    settings: Settings, org_id: str, funded_duration_s: int, answer: dict[str, Any]
) -> PlatformAnswer:
    """The platform's answer with the engine's overrides merged in (see admission_overrides):
    an assistant (saved or transient) or a squad takes them whole. A workflow's overrides carry
    only `variableValues` in Vapi's API: a transient workflow is given the engine's part in its
    own body (it is the engine's answer to write), a saved one must have the engine as its server
    by its own configuration (README; `vapi check` checks the ones answered). A `destination`
    transfers the call as it is."""
    error = answer.get("error")
    if error is not None:
        usable = isinstance(error, str) and error.strip() != ""
        return PlatformAnswer(None, error if usable else None, None)  # an empty error: not usable
    if isinstance(answer.get("destination"), dict):
        return PlatformAnswer({"destination": answer["destination"]}, None, None)
    for chosen_by, overrides_key in CHOICES:
        chosen = {key: answer[key] for key in chosen_by if _usable_choice(answer.get(key))}
        if len(chosen) != 1:
            continue
        asked = answer.get(overrides_key) if isinstance(answer.get(overrides_key), dict) else None
        merged: dict[str, Any] = dict(chosen)
        if overrides_key == "workflowOverrides":
            return _workflow_answer(settings, org_id, funded_duration_s, merged, asked)
        transient = chosen.get("assistant") if isinstance(chosen.get("assistant"), dict) else {}
        server_url = _server_url(asked) or _server_url(transient)
        merged[overrides_key] = admission_overrides(settings, org_id, funded_duration_s, asked, _messages_of(transient))
        if isinstance(chosen.get("squad"), dict):
            merged["squad"], squad_server_url = _squad_made_ours(settings, org_id, funded_duration_s, chosen["squad"])
            server_url = server_url or squad_server_url
        return PlatformAnswer(merged, None, server_url)
    return PlatformAnswer(None, None, None)


def _messages_of(assistant: Any) -> list[str] | None:
    messages = assistant.get("serverMessages") if isinstance(assistant, dict) else None
    return messages if isinstance(messages, list) else None


def _squad_made_ours(
    settings: Settings, org_id: str, funded_duration_s: int | None, squad: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """A transient squad's own override layers (`membersOverrides`, each member's
    `assistantOverrides`) get the engine's part too: which layer Vapi applies last is not ours to
    guess. Returns the squad and the first server URL the platform named in it."""
    squad = dict(squad)
    layers: list[Any] = [squad.get("membersOverrides")]
    members = []
    listed = squad.get("members")
    for member in listed if isinstance(listed, list) else []:
        if not isinstance(member, dict):
            members.append(member)
            continue
        asked = member.get("assistantOverrides") if isinstance(member.get("assistantOverrides"), dict) else None
        transient = member.get("assistant") if isinstance(member.get("assistant"), dict) else None
        layers += [asked, transient]
        overrides = admission_overrides(settings, org_id, funded_duration_s, asked, _messages_of(transient))
        members.append({**member, "assistantOverrides": overrides})
    if "members" in squad:
        squad["members"] = members
    asked_members = squad.get("membersOverrides") if isinstance(squad.get("membersOverrides"), dict) else None
    squad["membersOverrides"] = admission_overrides(settings, org_id, funded_duration_s, asked_members)
    return squad, next((url for url in map(_server_url, layers) if url), None)


def merge_handoff_answer(settings: Settings, org_id: str, answer: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The platform's answer to a `handoff-destination-request`: the call goes on with another
    assistant (or squad) the platform names, so the engine's part goes into its overrides as at
    admission (the engine its server, its messages, control), the duration left to the kill switch.
    Returns the answer and the server URL the platform named for the rest of the call."""
    destination = answer.get("destination")
    if not isinstance(destination, dict):
        return answer, None
    destination = dict(destination)
    server_url = None
    if destination.get("type") == "assistant":
        asked = (
            destination.get("assistantOverrides") if isinstance(destination.get("assistantOverrides"), dict) else None
        )
        transient = destination.get("assistant") if isinstance(destination.get("assistant"), dict) else None
        server_url = _server_url(asked) or _server_url(transient)
        destination["assistantOverrides"] = admission_overrides(settings, org_id, None, asked, _messages_of(transient))
    elif destination.get("type") == "squad":
        asked = destination.get("squadOverrides") if isinstance(destination.get("squadOverrides"), dict) else None
        server_url = _server_url(asked)
        destination["squadOverrides"] = admission_overrides(settings, org_id, None, asked)
        if isinstance(destination.get("squad"), dict):
            destination["squad"], squad_server_url = _squad_made_ours(settings, org_id, None, destination["squad"])
            server_url = server_url or squad_server_url
    return {**answer, "destination": destination}, server_url


def _workflow_answer(
    settings: Settings, org_id: str, funded_duration_s: int, merged: dict[str, Any], asked: dict[str, Any] | None
) -> PlatformAnswer:
    merged["workflowOverrides"] = {"variableValues": engine_variables((asked or {}).get("variableValues"), org_id)}
    if "workflowId" in merged:
        return PlatformAnswer(merged, None, None, workflow_id=merged["workflowId"])
    workflow = dict(merged["workflow"])  # a transient workflow (CreateWorkflowDto): no serverMessages in Vapi's API
    platform_server_url = _server_url(workflow)
    workflow["maxDurationSeconds"] = _shorter(workflow.get("maxDurationSeconds"), funded_duration_s)
    monitor = workflow.get("monitorPlan")
    workflow["monitorPlan"] = {**(monitor if isinstance(monitor, dict) else {}), "controlEnabled": True}
    server = engine_server(settings)
    if server is not None:
        workflow["server"] = server
    merged["workflow"] = workflow
    return PlatformAnswer(merged, None, platform_server_url)


def _usable_choice(value: Any) -> bool:
    return (isinstance(value, str) and value != "") or (isinstance(value, dict) and bool(value))


def _server_url(holder: Any) -> str | None:
    server = holder.get("server") if isinstance(holder, dict) else None
    url = server.get("url") if isinstance(server, dict) else None
    return url if isinstance(url, str) and url else None


async def remember_workflow(rt: Runtime, workflow_id: str, now_ms: int) -> None:
    """A platform answered a call with this saved workflow: `vapi check` checks that its own server
    is the engine (the only way the engine sees that call's messages). The newest are kept."""
    key = rt.keys.workflows_answered
    async with rt.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(key, {workflow_id: now_ms})
        pipe.zremrangebyrank(key, 0, -limits.vapi_workflows_remembered_max - 1)
        await pipe.execute()


async def workflows_answered(rt: Runtime, count_max: int) -> list[str]:
    """The saved workflows platforms answered with, newest first."""
    return [str(w) for w in await rt.redis.zrevrange(rt.keys.workflows_answered, 0, count_max - 1)]
