"""One-off asset charges (a phone number, a month of its rent): zero-debt, idempotent deductions.

The deduction is Redis-first: asset_deduct.lua checks available credit, deducts and appends the
ledger entry to the org's outbox in one atomic step; the worker writes it to Postgres.
A refusal records nothing, so the same idempotency key can succeed after a top-up.

The ledger, which keeps every key forever, is asked first: Redis forgets its idempotency records
after CREDIT_ENGINE_IDEMPOTENCY_TTL_S, and a key the ledger already has must never be charged in
Redis again (the ledger would refuse the second entry and Redis would drift from it). The same
key with the same charge is a replay; anything else under it is a conflict.
"""

from dataclasses import dataclass
from typing import Any

import orjson

from credit_engine.engine import validate
from credit_engine.engine.balances import money_now
from credit_engine.engine.decisions import decide
from credit_engine.engine.idempotency import client_ledger_key
from credit_engine.engine.results import Money, Outcome
from credit_engine.engine.runtime import Runtime


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
    """A client's purchase under its Idempotency-Key (the client namespace `asset`)."""
    validate.org_id(org_id)
    key = client_ledger_key(org_id, "asset", idempotency_key)
    return await charge_asset(rt, org_id, key, amount_pence, fingerprint=fingerprint, meta=meta)


async def charge_asset(
    rt: Runtime,
    org_id: str,
    key: str,
    amount_pence: int,
    *,
    fingerprint: str = "",
    meta: dict[str, Any] | None = None,
) -> AssetDeduction:
    """Charge `amount_pence` under the ledger key `key` (engine/idempotency.py derives every key)."""
    validate.org_id(org_id)
    validate.amount_pence(amount_pence)
    assert key.startswith(f"{org_id}/")
    if rt.pg is not None:  # a Redis-only runtime (the Lua tests) has no ledger to ask
        known = await _from_ledger(rt, org_id, key, amount_pence, fingerprint)
        if known is not None:
            return known
    keys = rt.keys.org(org_id)
    result = await decide(
        rt,
        "asset_deduct",
        org_id,
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
        tail_length=2,
        operation="asset charge",
    )
    charged_pence, balance_pence_after = result.tail
    if result.outcome == Outcome.ok:
        assert charged_pence == amount_pence
        assert balance_pence_after == result.money.balance_pence
        assert result.money.available_pence >= 0  # zero-debt: never below zero
    if result.outcome == Outcome.replayed:
        assert charged_pence == amount_pence
    return AssetDeduction(result.outcome, result.money, charged_pence, balance_pence_after, key)


async def _from_ledger(
    rt: Runtime, org_id: str, key: str, amount_pence: int, fingerprint: str
) -> AssetDeduction | None:
    """The deduction as the ledger has it, if it has it: a replay, or a conflict."""
    row = await rt.pg.fetchrow("SELECT amount_pence, meta FROM ledger_entries WHERE idempotency_key = $1", key)
    if row is None:
        return None
    meta = row["meta"] or {}
    money = await money_now(rt, org_id) or Money(0, 0, 0, 0, 0)
    if row["amount_pence"] == -amount_pence and meta.get("fingerprint", "") == fingerprint:
        balance_pence_after = int(meta.get("redis", {}).get("balance_after_pence", 0))
        return AssetDeduction(Outcome.replayed, money, amount_pence, balance_pence_after, key)
    return AssetDeduction(Outcome.idempotency_conflict, money, 0, 0, key)
