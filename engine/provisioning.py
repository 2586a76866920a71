"""Buying a phone number for an org (Phase 1 of the seed): charge first, then buy, refund on failure.

1. Claim the Idempotency-Key (engine/idempotent_requests.py): a replay gets the first response.
2. Deduct the server's price, zero-debt (asset_deduct.lua, idempotent by the same key). Not
   enough credit: 402, nothing charged, and the key is released so it can be retried after a
   top-up.
3. Buy the number from the provider. If that fails, refund the price (a Postgres-first refund,
   idempotent under a key derived from the request's, so exactly once) and answer 502. That key is
   then spent: retrying it replays the 502, and a refund already on the ledger for it means the
   purchase is never attempted again (no number after a refund).
4. Register the number to the org and answer 201.
A crash between steps leaves the claim in progress. A retry after CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S, or the worker's
`finish_abandoned_provisions` if the client never comes back, runs the steps again, each idempotent
(the deduction replays; the fake provider returns the same number; a number already registered
under the key is reused), so the org ends up with either its number or its money.

Vapi's own `POST /phone-number` takes no idempotency key: if a crash falls between Vapi selling
a number and our registering it, running the steps again can buy a second number (see README,
known limits).
"""

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.credits import credit
from credit_engine.engine.idempotency import credit_ledger_key, provision_refund_key
from credit_engine.engine.phone_numbers import number_for_provision_key, register_number
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import ProviderError, Telephony
from credit_engine.engine.types import EntryKind

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
        return Response(
            422, error_body("idempotency_key_reused", "this Idempotency-Key was used with a different request body")
        )
    if claimed.claim == claims.Claim.in_progress:
        return Response(
            409,
            error_body("request_in_progress", "a request with this Idempotency-Key is still running; retry shortly"),
        )
    return await _run_and_record(rt, telephony, org_id, key, request, price_pence, claimed.claimed_at)


async def _run_and_record(
    rt: Runtime,
    telephony: Telephony,
    org_id: str,
    key: str,
    request: ProvisionRequest,
    price_pence: int,
    claimed_at: datetime | None = None,
) -> Response:
    # If this raises before the provider was asked, our claim is made stale at once: every step so
    # far is idempotent, so a retry may run them again now (and if the client never comes back,
    # the worker's sweep still finds the claim and finishes it: a charge never waits without one).
    # After the provider was asked (it may have sold us a number) the claim stays fresh for
    # CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S, so that a slow first attempt is not doubled.
    attempt = _Attempt()
    try:
        response = await _run(rt, telephony, org_id, key, request, price_pence, attempt)
    except Exception:
        if not attempt.provider_asked and claimed_at is not None:
            with contextlib.suppress(Exception):  # Postgres may be what failed; then the claim goes stale by itself
                await claims.let_go(rt, org_id, OPERATION, key, claimed_at)
        raise
    if response.status in (201, 502):
        await claims.finish(rt, org_id, OPERATION, key, response.status, response.body)
    else:
        await claims.abandon(rt, org_id, OPERATION, key)
    return response


@dataclass
class _Attempt:
    provider_asked: bool = False


async def _run(
    rt: Runtime,
    telephony: Telephony,
    org_id: str,
    key: str,
    request: ProvisionRequest,
    price_pence: int,
    attempt: _Attempt,
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
        return Response(
            422, error_body("idempotency_key_reused", "this Idempotency-Key was used for a different charge")
        )
    if deduction.outcome == Outcome.outbox_full:
        return Response(503, error_body("ledger_backlog", "the ledger is behind; no new charges until it catches up"))
    if deduction.outcome == Outcome.org_unknown:
        return Response(503, error_body("state_restoring", "this account is being restored; retry shortly"))
    assert deduction.outcome in (Outcome.ok, Outcome.replayed)

    refunded = await _refund_entry(rt, org_id, key)
    if refunded is not None:
        # An earlier attempt refunded this purchase: it stays failed, whatever the provider says now.
        return _failed(price_pence, refunded)
    existing = await number_for_provision_key(rt, org_id, key)
    if existing is None:
        attempt.provider_asked = True
        try:
            # Bought bare: Vapi sends no assistant-request for a number with an assistant, so its
            # calls would skip the credit check. The engine keeps the assistant and answers it.
            bought = await telephony.buy(area_code=request.area_code, idempotency_key=f"{org_id}/{key}")
        except ProviderError as error:
            log.warning("provider %s failed for org %s: %s; refunding %dp", telephony.name, org_id, error, price_pence)
            refund = await credit(
                rt,
                org_id,
                provision_refund_key(key),
                price_pence,
                kind=EntryKind.refund,
                meta={"reason": "provider_failed", "provider": telephony.name},
            )
            return _failed(price_pence, refund.entry_id)
        existing = await register_number(
            rt,
            org_id,
            bought.vapi_phone_number_id,
            number=bought.number,
            assistant_id=request.assistant_id,
            provider=telephony.name,
            provision_key=key,
            status=bought.status,
        )
    return Response(
        201,
        {
            "phone_number": {"id": existing.vapi_phone_number_id, "number": existing.number, "status": existing.status},
            "charged_pence": price_pence,
            "balance_pence": deduction.balance_pence_after,
        },
    )


def _failed(price_pence: int, refund_entry_id: int) -> Response:
    return Response(
        502,
        error_body(
            "provider_failed",
            "the telephony provider could not supply a number; the charge was refunded",
            refunded_pence=price_pence,
            refund_transaction_id=refund_entry_id,
        ),
    )


async def _refund_entry(rt: Runtime, org_id: str, key: str) -> int | None:
    entry_id: int | None = await rt.pg.fetchval(
        "SELECT id FROM ledger_entries WHERE idempotency_key = $1",
        credit_ledger_key(org_id, EntryKind.refund.value, provision_refund_key(key)),
    )
    return entry_id


async def finish_abandoned_provisions(rt: Runtime, telephony: Telephony, price_pence: int) -> int:
    """Finish provisions whose client went away mid-request (the worker's cron): each ends with
    its number registered, or refunded, or (if it was never charged) released."""
    finished = 0
    for abandoned in await claims.stale_claims(rt, OPERATION):
        request = ProvisionRequest(abandoned.request.get("area_code"), abandoned.request.get("assistant_id"))
        try:
            response = await _run_and_record(
                rt, telephony, abandoned.org_id, abandoned.idempotency_key, request, price_pence
            )
        except Exception:  # left in progress; the next run tries again
            log.exception(
                "could not finish the abandoned provision %s of org %s", abandoned.idempotency_key, abandoned.org_id
            )
            continue
        log.warning("finished an abandoned provision of org %s: %d", abandoned.org_id, response.status)
        finished += 1
    return finished
