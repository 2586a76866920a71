"""Admin API (Authorization: Bearer <CREDIT_ENGINE_ADMIN_TOKEN>): orgs, API keys, top-ups, numbers."""

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine import org_setting_table as table
from credit_engine.engine.api_keys import issue_api_key, revoke_api_key
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.credits import TOP_UP, TopUp, top_up
from credit_engine.engine.errors import InvalidInput, OrgExists, OrgNotFound
from credit_engine.engine.keys import is_org_id
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.orgs import Org, create_org, get_org, update_org
from credit_engine.engine.phone_numbers import NumberTaken, check_phone_number_id, register_number
from credit_engine.webapp import answers
from credit_engine.webapp import requests as req
from credit_engine.webapp.auth import require_admin
from credit_engine.webapp.context import AppContext, context
from credit_engine.webapp.responses import ApiError, json_response
from credit_engine.webapp.wallet import wallet_json

SETTINGS_FIELDS = set(OrgSettings.names())
KEY_ID = re.compile(r"key_[0-9a-f]{16}")


def admin(request: Request) -> AppContext:
    ctx = context(request)
    require_admin(request, ctx.settings)
    return ctx


def org_json(org: Org) -> dict[str, Any]:
    """An org as the admin API shows it: each setting as declared (engine/org_setting_table.py),
    null where unset and the default applies (CREDIT_ENGINE_FORWARD_URL, the engine's sentences)."""
    return {
        "org_id": org.org_id,
        "name": org.name,
        **org.settings.shown(),
        "created_at": org.created_at.isoformat(),
        "updated_at": org.updated_at.isoformat(),
    }


def _org_id(request: Request) -> str:
    org_id = request.path_params["org_id"]
    if not is_org_id(org_id):
        raise ApiError(404, "not_found", "no such org")
    return str(org_id)


async def create(request: Request) -> Response:
    ctx = admin(request)
    body = await req.json_object(request, allowed={"org_id", "name"} | SETTINGS_FIELDS)
    org_id = req.text(body, "org_id", required=True, length_max=64)
    assert org_id is not None
    name = req.text(body, "name", required=True)
    assert name is not None
    for setting in table.SETTINGS:
        if setting.required:
            assert setting.kind == "integer", setting.name  # the one required setting today is the rate
            req.whole_number(body, setting.name, setting.minimum, setting.maximum)
    settings = OrgSettings(**{k: v for k, v in body.items() if k in SETTINGS_FIELDS})
    try:
        org = await create_org(ctx.rt, org_id, name, settings)
    except OrgExists:
        raise ApiError(409, "org_exists", f"org {org_id!r} already exists", field="org_id") from None
    return json_response(org_json(org), 201)


async def show(request: Request) -> Response:
    ctx = admin(request)
    org = await get_org(ctx.rt, _org_id(request))
    wallet = await read_wallet(ctx.rt, org.org_id)
    body = org_json(org)
    if wallet is not None:  # None while Redis does not hold the org (it is being restored)
        body["wallet"] = wallet_json(wallet)
    return json_response(body)


async def change(request: Request) -> Response:
    ctx = admin(request)
    org_id = _org_id(request)
    body = await req.json_object(request, allowed={"name"} | SETTINGS_FIELDS)
    if not body:
        raise ApiError(422, "missing_field", "send at least one setting to change")
    org = await update_org(ctx.rt, org_id, dict(body))
    return json_response(org_json(org))


async def new_api_key(request: Request) -> Response:
    ctx = admin(request)
    key_id, api_key = await issue_api_key(ctx.rt, _org_id(request))
    return json_response({"key_id": key_id, "api_key": api_key}, 201)


async def revoke(request: Request) -> Response:
    ctx = admin(request)
    key_id = str(request.path_params["key_id"])
    if KEY_ID.fullmatch(key_id) is None or not await revoke_api_key(ctx.rt, _org_id(request), key_id):
        raise ApiError(404, "not_found", "no such active key for this org")
    return Response(status_code=204)


async def topup(request: Request) -> Response:
    ctx = admin(request)
    org_id = _org_id(request)
    key = req.idempotency_key(request)
    body = await req.json_object(request, allowed={"amount_pence"})
    amount = req.amount_pence(body)
    await get_org(ctx.rt, org_id)  # 404 before claiming a key for an org that does not exist
    once = await top_up(ctx.rt, org_id, key, amount, meta={"via": "admin_api"})
    answered = answers.claimed(TOP_UP, once, _topped_up)
    if once.claim == claims.Claim.new and once.result is not None and once.result.kept():
        ctx.metrics.decision(TOP_UP, once.result.outcome.name)
    return answered.response


def _topped_up(result: TopUp) -> dict[str, Any]:
    return {
        "transaction_id": result.transaction_id,
        "balance_pence": result.balance_pence,
        "available_pence": result.available_pence,
        "applied": result.applied,
    }


async def register_phone_number(request: Request) -> Response:
    ctx = admin(request)
    body = await req.json_object(request, allowed={"vapi_phone_number_id", "number", "org_id", "assistant_id"})
    try:
        number_id = check_phone_number_id(body.get("vapi_phone_number_id"))
    except InvalidInput:
        raise ApiError(
            422,
            "invalid_field",
            "vapi_phone_number_id must be 1-128 printable characters",
            field="vapi_phone_number_id",
        ) from None
    org_id = req.text(body, "org_id", required=True, length_max=64)
    assert org_id is not None
    try:
        number = await register_number(
            ctx.rt,
            org_id,
            number_id,
            number=req.text(body, "number", length_max=32),
            assistant_id=req.text(body, "assistant_id", length_max=128),
            provider="vapi",
        )
    except NumberTaken:
        raise ApiError(
            409, "number_taken", "this phone number is registered to another org", field="vapi_phone_number_id"
        ) from None
    except OrgNotFound:
        raise ApiError(404, "not_found", f"no org {org_id!r}", field="org_id") from None
    return json_response(
        {
            "vapi_phone_number_id": number.vapi_phone_number_id,
            "org_id": number.org_id,
            "number": number.number,
            "assistant_id": number.assistant_id,
            "status": number.status,
        },
        201,
    )
