"""Outbound calls through the engine (org API key): POST /api/calls reserves credit, places the
call at Vapi with the engine as its server, and answers Vapi's call id (engine/dial.py has the
steps and the failure cases). The request to Vapi goes only to VAPI_BASE_URL, with VAPI_API_KEY:
nothing in the request names an address."""

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine import limits
from credit_engine.engine.control import control_url_allowed
from credit_engine.engine.dial import OPERATION, Dial, Dialled, DialRequest, dial
from credit_engine.engine.vapi_account import VapiAccount
from credit_engine.webapp import answers
from credit_engine.webapp import requests as req
from credit_engine.webapp.context import AppContext
from credit_engine.webapp.responses import ApiError
from credit_engine.webapp.wallet import org_context

FIELDS = {"phone_number_id", "customer", "assistant_id", "assistant", "assistant_overrides", "name"}
create_call_timeout_s = limits.vapi_create_call_timeout_s  # tests shorten it


async def place_call(request: Request) -> Response:
    ctx, org_id = await org_context(request)
    key = req.idempotency_key(request)
    body = await req.json_object(request, allowed=FIELDS)
    wanted = DialRequest.parse(body)
    req.check_storable(body)
    if ctx.settings.vapi_api_key is None:
        raise ApiError(503, "vapi_not_configured", "this deployment has no VAPI_API_KEY: it cannot place calls at Vapi")
    if ctx.settings.public_url is None:
        # Without it the call would not name the engine as its server: its messages would go
        # elsewhere, and nothing would start its clock, end it or bill it as it runs.
        raise ApiError(
            503,
            "public_url_not_configured",
            "this deployment has no CREDIT_ENGINE_PUBLIC_URL: a call placed now would not report to the engine",
        )
    ctx.require_ready()
    async with VapiAccount(
        ctx.settings.vapi_api_key,
        ctx.settings.vapi_base_url,
        timeout_s=create_call_timeout_s,
        redacted=(ctx.settings.vapi_webhook_secret,),
    ) as vapi:
        once = await dial(ctx.rt, vapi, org_id, key, wanted)
    if once.claim == claims.Claim.new and once.result is not None:
        await _remember(ctx, org_id, once.result, wanted.platform_server_url)
    answered = answers.claimed(OPERATION, once, _placed)
    ctx.metrics.decision(OPERATION, answered.label)
    return answered.response


async def _remember(ctx: AppContext, org_id: str, result: Dial, forward_url: str | None) -> None:
    """Index the placed call for its org, keep its control URL (if it is Vapi's) for the kill
    switch (the call's status-update brings both again), and where the platform asked for the
    call's messages (engine/forwarding.py sends them on, through the outbound guard)."""
    if result.outcome != Dialled.placed or result.call_id is None:
        return
    control_url = result.control_url
    if control_url is not None and not control_url_allowed(ctx.settings, control_url):
        control_url = None
    await ctx.calls.remember(result.call_id, org_id, control_url, forward_url)
    ctx.forwarder.targets.pop(result.call_id, None)


def _placed(result: Dial) -> dict[str, Any]:
    return {
        "call_id": result.call_id,
        "hold_pence": result.hold_pence,
        "max_duration_seconds": result.max_duration_s,
        "status": result.status or "unknown",
    }
