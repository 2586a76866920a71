"""Org endpoints (Authorization: Bearer <org api key>). Every read and write is scoped to the key's
org: there is no parameter naming an org, so another org's data cannot even be asked for."""

import base64
import binascii
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine.attribution import resolved_in_postgres
from credit_engine.engine.balances import Wallet, read_wallet
from credit_engine.engine.decisions import restoring
from credit_engine.engine.forwarding import org_forward_secret
from credit_engine.engine.holds import (
    Reservation,
    live_holds,
    release_call,
    remembered_resolution,
    reserve_call,
    resolution_in_postgres,
)
from credit_engine.engine.idempotency import is_dial_reservation_id
from credit_engine.engine.keys import is_call_id
from credit_engine.engine.ledger import ledger_page
from credit_engine.engine.results import Outcome
from credit_engine.engine.timeutil import dt_from_ms
from credit_engine.webapp import answers
from credit_engine.webapp.auth import require_org
from credit_engine.webapp.context import AppContext, context
from credit_engine.webapp.responses import ApiError, json_response

CURRENCY = "GBP"
page_size_default = 50
page_size_max = 200


async def org_context(request: Request) -> tuple[AppContext, str]:
    ctx = context(request)
    return ctx, await require_org(request, ctx.rt)


async def _wallet(ctx: AppContext, org_id: str) -> Wallet:
    wallet = await read_wallet(ctx.rt, org_id)
    if wallet is None and await ctx.bring_org_in(org_id):
        wallet = await read_wallet(ctx.rt, org_id)
    if wallet is None:
        raise answers.error(answers.RESTORING)
    return wallet


def wallet_json(wallet: Wallet) -> dict[str, Any]:
    """The one wallet shape (OpenAPI: WalletState): the org's own GET /api/wallet puts it between
    the org's id and its currency, the admin's view of an org carries it as `wallet`."""
    return {
        "balance_pence": wallet.balance_pence,
        "held_pence": wallet.held_pence,
        "available_pence": wallet.available_pence,
        "debt_pence": wallet.debt_pence,
        "live_calls": wallet.live_calls,
    }


async def show_wallet(request: Request) -> Response:
    ctx, org_id = await org_context(request)
    wallet = await _wallet(ctx, org_id)
    return json_response({"org_id": org_id, **wallet_json(wallet), "currency": CURRENCY})


def _cursor(request: Request) -> int | None:
    raw = request.query_params.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        value = int(base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4)).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(422, "invalid_field", "cursor is not one this API gave out", field="cursor") from None
    if not 0 < value < 2**63:
        raise ApiError(422, "invalid_field", "cursor is not one this API gave out", field="cursor")
    return value


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return page_size_default
    if re.fullmatch(r"[0-9]{1,4}", raw) is None or not 1 <= int(raw) <= page_size_max:
        raise ApiError(422, "invalid_field", f"limit must be a whole number from 1 to {page_size_max}", field="limit")
    return int(raw)


async def transactions(request: Request) -> Response:
    """The ledger, newest first. The cursor is an entry id, so pages stay stable while new
    entries arrive (they are newer than any page already read)."""
    ctx, org_id = await org_context(request)
    limit = _limit(request)
    before = _cursor(request)
    rows = await ledger_page(ctx.rt, org_id, before, limit + 1)
    page = rows[:limit]
    items = [
        {
            "id": row["id"],
            "kind": row["kind"],
            "amount_pence": row["amount_pence"],
            "debt_delta_pence": row["debt_delta_pence"],
            "balance_after_pence": row["balance_after_pence"],
            "call_id": row["call_id"],
            "idempotency_key": row["idempotency_key"].removeprefix(f"{org_id}/"),
            "created_at": row["created_at"].isoformat(),
        }
        for row in page
    ]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = base64.urlsafe_b64encode(str(page[-1]["id"]).encode()).decode().rstrip("=")
    return json_response({"items": items, "next_cursor": next_cursor})


def _hold_json(call_id: str, hold: Any) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "hold_pence": hold.hold_pence,
        "rate_pence_per_minute": hold.rate_pence_per_minute,
        "created_at": dt_from_ms(hold.created_ms).isoformat(),
        "started_at": dt_from_ms(hold.started_ms).isoformat() if hold.started_ms else None,
        "ended_at": dt_from_ms(hold.ended_ms).isoformat() if hold.ended_ms else None,
        "expires_at": dt_from_ms(hold.expires_ms).isoformat(),
        "max_duration_seconds": hold.max_duration_s,
    }


async def holds(request: Request) -> Response:
    ctx, org_id = await org_context(request)
    held = await live_holds(ctx.rt, org_id)
    return json_response({"items": [_hold_json(call_id, hold) for call_id, hold in sorted(held.items())]})


def _call_id(request: Request) -> str:
    call_id = request.path_params["call_id"]
    if not is_call_id(call_id):
        raise ApiError(422, "invalid_field", "call_id must be 1-128 characters of A-Z a-z 0-9 _ . : -", field="call_id")
    return str(call_id)


async def show_call(request: Request) -> Response:
    """A call of this org: its live hold, or how it was resolved. Another org's call is a 404."""
    ctx, org_id = await org_context(request)
    call_id = _call_id(request)
    hold = (await live_holds(ctx.rt, org_id)).get(call_id)
    if hold is not None:
        return json_response({"status": "live", **_hold_json(call_id, hold)})
    state = await remembered_resolution(ctx.rt, org_id, call_id)
    if state is None:
        row = await resolution_in_postgres(ctx.rt, org_id, call_id)
        if row is None:
            raise ApiError(404, "not_found", "no such call for this org")
        return json_response(
            {
                "call_id": call_id,
                "status": row["status"],
                "charged_pence": row["charged_pence"],
                "billed_seconds": row["billed_seconds"],
            }
        )
    return json_response(
        {
            "call_id": call_id,
            "status": state.status.value,
            "charged_pence": state.charged_pence,
            "billed_seconds": state.billed_seconds,
        }
    )


async def reserve(request: Request) -> Response:
    """Reserve credit for an outbound call (Vapi sends no assistant-request for those)."""
    ctx, org_id = await org_context(request)
    call_id = _call_id(request)
    if is_dial_reservation_id(call_id):
        raise ApiError(
            422, "invalid_field", "this id is one the engine reserves calls it places under", field="call_id"
        )
    ctx.require_ready()
    await _check_call_is_new(ctx, org_id, call_id)
    reservation = await restoring(ctx.rt, org_id, lambda: reserve_call(ctx.rt, org_id, call_id))
    ctx.metrics.decision("reserve", reservation.outcome.name)
    if reservation.held and not reservation.funded:
        raise ApiError(
            409, "call_not_funded", "this call is already running without credit and is being ended", field="call_id"
        )
    if reservation.outcome in (Outcome.ok, Outcome.replayed):
        if not await ctx.calls.remember(call_id, org_id):  # another org admitted it meanwhile
            await release_call(ctx.rt, org_id, call_id)
            raise ApiError(409, "call_taken", "another org admitted this call id", field="call_id")
        headers = {"Idempotent-Replayed": "true"} if reservation.outcome == Outcome.replayed else None
        return json_response(
            {
                "call_id": call_id,
                "hold_pence": reservation.hold_pence,
                "max_duration_seconds": reservation.max_duration_s,
                "available_pence": reservation.money.available_pence,
            },
            201,
            headers=headers,
        )
    raise _refusal(reservation)


async def _check_call_is_new(ctx: AppContext, org_id: str, call_id: str) -> None:
    """Raises unless a hold for this call may be made: not resolved in Postgres, not another org's."""
    resolved = await resolved_in_postgres(ctx.rt, org_id, call_id)
    if resolved:
        # Resolved longer ago than Redis remembers (its own check refuses a recent one): a new hold
        # would be a phantom of a finished call.
        raise ApiError(409, "call_already_resolved", "this call has already ended and been billed", field="call_id")
    if resolved is None:
        # Postgres cannot say: a hold now could be such a phantom, which nothing would expire
        # (Postgres has the call resolved). Refused; the platform retries.
        raise ApiError(503, "unavailable", "cannot check this call id against the ledger now; retry shortly")
    owner = await ctx.calls.org_of(call_id)
    if owner is not None and owner != org_id:
        raise ApiError(409, "call_taken", "another org admitted this call id", field="call_id")


def _refusal(reservation: Reservation) -> ApiError:
    """The API's answer to a reservation the engine did not make (webapp/answers.py)."""
    error = answers.refused("reserve", reservation.outcome, reservation)
    assert error is not None, reservation.outcome
    return error


async def forwarding_secret(request: Request) -> Response:
    """The X-Vapi-Secret the engine sends with what it forwards to the org's own platform (its
    `forward_url`, and any server URL its platform's answers name): derived per org, never the
    deployment's own (engine/forwarding.org_forward_secret)."""
    ctx, org_id = await org_context(request)
    if ctx.settings.forward_secret is None:
        raise ApiError(
            404,
            "forwarding_unsigned",
            "this deployment has no CREDIT_ENGINE_FORWARD_SECRET: forwarded messages carry no secret",
        )
    return json_response({"secret": org_forward_secret(ctx.settings.forward_secret, org_id), "header": "X-Vapi-Secret"})
