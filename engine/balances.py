"""Reading an org's live money from Redis (the source of every decision)."""

from dataclasses import dataclass

from engine import validate
from engine.runtime import Runtime


@dataclass(frozen=True)
class Wallet:
    org_id: str
    balance_pence: int
    held_pence: int
    available_pence: int
    debt_pence: int
    live_calls: int


async def read_wallet(rt: Runtime, org_id: str) -> Wallet | None:
    """The org's money as Redis has it now; None when Redis does not have the org."""
    validate.org_id(org_id)
    keys = rt.keys.org(org_id)
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.hmget(keys.org, ["balance_pence", "held_pence", "debt_pence"])
        pipe.hlen(keys.holds)
        (balance, held, debt), live_calls = await pipe.execute()
    if balance is None:
        return None
    wallet = Wallet(org_id, int(balance), int(held), int(balance) - int(held), int(debt), live_calls)
    assert wallet.held_pence >= 0
    assert wallet.debt_pence >= 0
    return wallet
