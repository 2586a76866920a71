"""Buying a phone number for an org (Phase 1 of the seed): charge first, then buy, refund on failure.

1. Claim the Idempotency-Key (engine/idempotent_requests.py): a replay gets the first response.
2. Deduct the server's price, zero-debt (asset_deduct.lua, idempotent by the same key). Not
   enough credit: 402, nothing charged, and the key is released so it can be retried after a
   top-up.
3. Buy the number from the provider. If that fails, refund the price (a Postgres-first refund,
   idempotent by the key, so exactly once) and answer 502. That key is then spent: retrying it
   replays the 502; a new attempt needs a new key (the deduction under the old key happened).
4. Register the number to the org and answer 201.
A crash between steps leaves the claim in progress; a retry after `stale_after_s` runs the steps
again, each idempotent (a deduction replays; the fake provider returns the same number; a
number already registered under the key is reused).
"""

import logging
from dataclasses import dataclass
from typing import Any

from engine import idempotent_requests as claims
from engine.assets import deduct_asset
from engine.credits import credit
from engine.phone_numbers import number_for_provision_key, register_number
from engine.results import Outcome
from engine.runtime import Runtime
from engine.telephony import ProviderError, Telephony
from engine.types import EntryKind

log = logging.getLogger(__name__)

OPERATION = "provision"


@dataclass(frozen=True)
class ProvisionRequest:
    area_code: str | None
    assistant_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"area_code": self.area_code, "assistant_id": self.assistant_id}


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]
    replayed: bool = False


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


async def provision(
    rt: Runtime, telephony: Telephony, org_id: str, key: str, request: ProvisionRequest, price_pence: int
) -> Response:
    claimed = await claims.begin(rt, org_id, OPERATION, key, request.as_dict())
    if claimed.claim == claims.Claim.replay:
        assert claimed.status is not None and claimed.body is not None
        return Response(claimed.status, claimed.body, replayed=True)
    if claimed.claim == claims.Claim.conflict:
        return Response(422, error_body("idempotency_key_reused", "this Idempotency-Key was used with a different request body"))
    if claimed.claim == claims.Claim.in_progress:
        return Response(409, error_body("request_in_progress", "a request with this Idempotency-Key is still running; retry shortly"))
    # If this raises, nothing is recorded as the answer: a retry after the claim goes stale runs
    # the steps again, each of them idempotent.
    response = await _run(rt, telephony, org_id, key, request, price_pence)
    if response.status in (201, 502):
        await claims.finish(rt, org_id, OPERATION, key, response.status, response.body)
    else:
        await claims.abandon(rt, org_id, OPERATION, key)
    return response


async def _run(
    rt: Runtime, telephony: Telephony, org_id: str, key: str, request: ProvisionRequest, price_pence: int
) -> Response:
    fingerprint = claims.request_sha256(request.as_dict()).hex()
    deduction = await deduct_asset(
        rt, org_id, key, price_pence, fingerprint=fingerprint, meta={"asset": "phone_number", **request.as_dict()}
    )
    if deduction.outcome == Outcome.insufficient_funds:
        return Response(
            402,
            error_body(
                "insufficient_balance",
                f"a phone number costs {price_pence} pence; {deduction.money.available_pence} pence is available",
                required_pence=price_pence,
                available_pence=deduction.money.available_pence,
            ),
        )
    if deduction.outcome == Outcome.idempotency_conflict:
        return Response(422, error_body("idempotency_key_reused", "this Idempotency-Key was used for a different charge"))
    if deduction.outcome == Outcome.outbox_full:
        return Response(503, error_body("ledger_backlog", "the ledger is behind; no new charges until it catches up"))
    if deduction.outcome == Outcome.org_unknown:
        return Response(503, error_body("state_restoring", "this account is being restored; retry shortly"))
    assert deduction.outcome in (Outcome.ok, Outcome.replayed)

    existing = await number_for_provision_key(rt, org_id, key)
    if existing is None:
        try:
            bought = await telephony.buy(area_code=request.area_code, assistant_id=request.assistant_id, idempotency_key=f"{org_id}/{key}")
        except ProviderError as error:
            log.warning("provider %s failed for org %s: %s; refunding %dp", telephony.name, org_id, error, price_pence)
            refund = await credit(rt, org_id, f"provision:{key}", price_pence, kind=EntryKind.refund,
                                  meta={"reason": "provider_failed", "provider": telephony.name})  # fmt: skip
            return Response(
                502,
                error_body(
                    "provider_failed",
                    "the telephony provider could not supply a number; the charge was refunded",
                    refunded_pence=price_pence,
                    refund_transaction_id=refund.entry_id,
                ),
            )
        existing = await register_number(
            rt, org_id, bought.vapi_phone_number_id, number=bought.number, assistant_id=request.assistant_id,
            provider=telephony.name, provision_key=key, status=bought.status,
        )  # fmt: skip
    return Response(
        201,
        {
            "phone_number": {"id": existing.vapi_phone_number_id, "number": existing.number, "status": existing.status},
            "charged_pence": price_pence,
            "balance_pence": deduction.balance_pence_after,
        },
    )
