"""Buying a phone number for an org (Phase 1 of the seed): charge first, then buy, refund on failure.

1. Claim the Idempotency-Key (engine/idempotent_requests.once): a replay gets the first result.
2. Deduct the server's price, zero-debt (asset_deduct.lua, idempotent by the same key). Not
   enough credit: insufficient_funds, nothing charged, and the key is released so it can be
   retried after a top-up.
3. Buy the number from the provider. If that fails, refund the price (a Postgres-first refund,
   idempotent under a key derived from the request's, so exactly once): provider_failed. That key
   is then spent: retrying it replays the failure, and a refund already on the ledger for it means
   the purchase is never attempted again (no number after a refund).
4. Register the number to the org: bought.
The engine returns these outcomes; the web app answers them (webapp/answers.py: 201, 402, 502...).
A crash between steps leaves the claim in progress. A retry after CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S, or the worker's
`finish_abandoned_provisions` if the client never comes back, runs the steps again, each idempotent
(the deduction replays; the fake provider returns the same number; a number already registered
under the key is reused), so the org ends up with either its number or its money.

Vapi's own `POST /phone-number` takes no idempotency key: if a crash falls between Vapi selling
a number and our registering it, running the steps again can buy a second number (see README,
known limits).
"""

import logging
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.credits import credit
from credit_engine.engine.idempotency import credit_ledger_key, provider_purchase_key, provision_refund_key
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


class Provided(Enum):
    """How a purchase ended. The refusals carry the deduction's outcome name."""

    bought = "bought"
    provider_failed = "provider_failed"  # charged, then refunded: the key is spent
    insufficient_funds = Outcome.insufficient_funds.name
    idempotency_conflict = Outcome.idempotency_conflict.name  # the key charged something else
    outbox_full = Outcome.outbox_full.name
    org_unknown = Outcome.org_unknown.name


KEPT = frozenset({Provided.bought, Provided.provider_failed})  # what a replay of the key gets back


@dataclass(frozen=True)
class Provision:
    """A purchase's result, and the record its claim keeps (replays decode the same fields)."""

    outcome: Provided
    price_pence: int
    phone_number: dict[str, Any] | None = None  # bought: {"id", "number", "status"}
    balance_pence: int | None = None  # bought: the org's balance after the charge
    available_pence: int | None = None  # insufficient_funds: what the org had
    refund_transaction_id: int | None = None  # provider_failed: the refund's ledger entry

    def kept(self) -> bool:
        return self.outcome in KEPT

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome.value}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Provision":
        known = {name: record[name] for name in cls.__dataclass_fields__ if name in record}  # a newer release's too
        return cls(**{**known, "outcome": Provided(record["outcome"])})


async def provision(
    rt: Runtime, telephony: Telephony, org_id: str, key: str, request: ProvisionRequest, price_pence: int
) -> claims.Once[Provision]:
    """Buy a number under the client's key, once (engine/idempotent_requests.once)."""
    return await claims.once(
        rt,
        org_id,
        OPERATION,
        key,
        request.as_dict(),
        lambda attempt: _run(rt, telephony, org_id, key, request, price_pence, attempt),
        Provision.from_record,
    )


async def _run(
    rt: Runtime,
    telephony: Telephony,
    org_id: str,
    key: str,
    request: ProvisionRequest,
    price_pence: int,
    attempt: claims.Attempt,
) -> Provision:
    # A failure before the provider was asked lets the claim go at once: every step so far is
    # idempotent, so a retry may run them again now (and if the client never comes back, the
    # worker's sweep still finds the claim and finishes it: a charge never waits without one).
    # After the provider was asked (it may have sold us a number) the claim stays fresh for
    # CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S, so that a slow first attempt is not doubled.
    attempt.changed = True
    fingerprint = claims.request_sha256(request.as_dict()).hex()
    deduction = await deduct_asset(
        rt, org_id, key, price_pence, fingerprint=fingerprint, meta={"asset": "phone_number", **request.as_dict()}
    )
    if deduction.outcome not in (Outcome.ok, Outcome.replayed):
        return Provision(Provided(deduction.outcome.name), price_pence, available_pence=deduction.money.available_pence)

    refunded = await _refund_entry(rt, org_id, key)
    if refunded is not None:
        # An earlier attempt refunded this purchase: it stays failed, whatever the provider says now.
        return Provision(Provided.provider_failed, price_pence, refund_transaction_id=refunded)
    existing = await number_for_provision_key(rt, org_id, key)
    if existing is None:
        attempt.asked_outside = True
        try:
            # Bought bare: Vapi sends no assistant-request for a number with an assistant, so its
            # calls would skip the credit check. The engine keeps the assistant and answers it.
            bought = await telephony.buy(
                area_code=request.area_code, idempotency_key=provider_purchase_key(org_id, key)
            )
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
            return Provision(Provided.provider_failed, price_pence, refund_transaction_id=refund.entry_id)
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
    return Provision(
        Provided.bought,
        price_pence,
        phone_number={"id": existing.vapi_phone_number_id, "number": existing.number, "status": existing.status},
        balance_pence=deduction.balance_pence_after,
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
            result = await claims.settle(
                rt,
                abandoned.org_id,
                OPERATION,
                abandoned.idempotency_key,
                lambda attempt: _run(
                    rt, telephony, abandoned.org_id, abandoned.idempotency_key, request, price_pence, attempt
                ),
                claimed_at=None,
            )
        except Exception:  # left in progress; the next run tries again
            log.exception(
                "could not finish the abandoned provision %s of org %s", abandoned.idempotency_key, abandoned.org_id
            )
            continue
        log.warning("finished an abandoned provision of org %s: %s", abandoned.org_id, result.outcome.value)
        finished += 1
    return finished
