"""One-off asset purchases (a phone number): zero-debt, idempotent deductions.

The deduction is Redis-first: asset_deduct.lua checks available credit, deducts and appends the
ledger entry to the org's outbox in one atomic step; the worker writes it to Postgres.
A refusal records nothing, so the same idempotency key can succeed after a top-up.
"""

from dataclasses import dataclass
from typing import Any

import orjson

from engine import validate
from engine.killswitch import file_depletion
from engine.outbox import note_refused_for_full_outbox
from engine.results import Money, Outcome, decode
from engine.runtime import Runtime
from engine.types import ledger_key


@dataclass(frozen=True)
class AssetDeduction:
    outcome: Outcome  # ok, replayed, insufficient_funds, org_unknown, idempotency_conflict, outbox_full
    money: Money
    charged_pence: int
    balance_pence_after: int  # right after the deduction (the first one, for a replay)
    ledger_key: str


async def deduct_asset(
    rt: Runtime,
    org_id: str,
    idempotency_key: str,
    amount_pence: int,
    *,
    fingerprint: str = "",
    meta: dict[str, Any] | None = None,
) -> AssetDeduction:
    validate.org_id(org_id)
    validate.idempotency_key(idempotency_key)
    validate.amount_pence(amount_pence)
    keys = rt.keys.org(org_id)
    key = ledger_key(org_id, "asset", idempotency_key)
    reply = await rt.scripts.run_and_ring(
        rt.redis,
        "asset_deduct",
        [keys.org, keys.idem, keys.idem_exp, keys.outbox],
        [
            rt.clock.script_arg(),
            org_id,
            key,
            amount_pence,
            fingerprint,
            rt.settings.idempotency_ttl_ms,
            rt.settings.outbox_per_org_max,
            orjson.dumps(meta or {}).decode(),
        ],
        rt.keys.outbox_dirty(org_id),
        org_id,
    )
    result = decode(reply, tail_length=2)
    await file_depletion(rt, org_id, result.depletion_ms)
    charged_pence, balance_pence_after = result.tail
    if result.outcome == Outcome.ok:
        assert charged_pence == amount_pence
        assert balance_pence_after == result.money.balance_pence
        assert result.money.available_pence >= 0  # zero-debt: never below zero
    if result.outcome == Outcome.replayed:
        assert charged_pence == amount_pence
    if result.outcome == Outcome.outbox_full:
        note_refused_for_full_outbox(org_id, "asset charge", rt.settings.outbox_per_org_max)
    return AssetDeduction(result.outcome, result.money, charged_pence, balance_pence_after, key)
