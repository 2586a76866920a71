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

from typing import Any

from engine import limits
from engine.config import Settings

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
    funded_duration_s: int,
    asked: dict[str, Any] | None = None,
    assistant_server_messages: list[str] | None = None,
) -> dict[str, Any]:
    """The `assistantOverrides` (or `squadOverrides`) of an answer that admits a call: `asked`
    (what the platform's own answer overrode, if anything) with the engine's part merged in."""
    assert limits.max_duration_s_min <= funded_duration_s <= limits.max_duration_s_max
    overrides = dict(asked or {})
    overrides["maxDurationSeconds"] = _shorter(overrides.get("maxDurationSeconds"), funded_duration_s)
    variables = overrides.get("variableValues")
    overrides["variableValues"] = {**(variables if isinstance(variables, dict) else {}), "org_id": org_id}
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
