"""Reading an org's live money from Redis (the source of every decision)."""

from dataclasses import dataclass

from credit_engine.engine import validate
from credit_engine.engine.results import Money, Outcome
from credit_engine.engine.runtime import Runtime


@dataclass(frozen=True)
class Wallet:
    org_id: str
    balance_pence: int
    held_pence: int
    available_pence: int
    debt_pence: int
    live_calls: int


async def peek_org(rt: Runtime, org_id: str) -> list[int]:
    """{code, balance, held, debt, live_calls, seq, outbox_entries} at one instant (lua/org_peek.lua)."""
    keys = rt.keys.org(org_id)
    return await rt.scripts.run(rt.redis, "org_peek", [keys.org, keys.holds, keys.outbox], [])


async def read_wallet(rt: Runtime, org_id: str) -> Wallet | None:
    """The org's money as Redis has it now; None when Redis does not have the org."""
    validate.org_id(org_id)
    code, balance, held, debt, live_calls, _, _ = await peek_org(rt, org_id)
    if code != 0:
        return None
    wallet = Wallet(org_id, balance, held, balance - held, debt, live_calls)
    assert wallet.held_pence >= 0
    assert wallet.debt_pence >= 0
    return wallet


async def projected_balance_pence(rt: Runtime, org_id: str) -> int | None:
    """The org's balance as Postgres's projection (org_balances) has it: the ledger's answer for a
    credit committed there and not yet applied in Redis. None when Postgres does not have the org."""
    balance: int | None = await rt.pg.fetchval("SELECT balance_pence FROM org_balances WHERE org_id = $1", org_id)
    return balance


async def money_now(rt: Runtime, org_id: str) -> Money | None:
    """The org's money in Redis as it stands, for answers that ran no script (None: Redis does not
    have the org)."""
    code, balance, held, debt, _, seq, _ = await peek_org(rt, org_id)
    return Money(balance, held, balance - held, debt, seq) if code == Outcome.ok else None
