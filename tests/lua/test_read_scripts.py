"""The read-only scripts (org_peek, org_read): one instant of one org, nothing changed."""

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.balances import peek_org, read_wallet
from credit_engine.engine.holds import reserve_call
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.lua.conftest import seed_org


async def snapshot(rt: Runtime, org_id: str) -> dict[str, object]:
    keys = rt.keys.org(org_id)
    return {
        "org": await rt.redis.hgetall(keys.org),
        "holds": await rt.redis.hgetall(keys.holds),
        "outbox": await rt.redis.xrange(keys.outbox),
    }


async def test_peek_reads_money_live_calls_seq_and_outbox_and_changes_nothing(redis_rt: Runtime) -> None:
    rt = redis_rt
    org = await seed_org(rt, 5_000)
    assert (await deduct_asset(rt, org, "n1", 1_200)).outcome == Outcome.ok
    reservation = await reserve_call(rt, org, "c1")
    assert reservation.outcome == Outcome.ok
    before = await snapshot(rt, org)
    code, balance, held, debt, live_calls, seq, outbox_entries = await peek_org(rt, org)
    assert (code, balance, held, debt, live_calls) == (0, 3_800, reservation.hold_pence, 0, 1)
    assert seq == int(before["org"]["seq"])  # type: ignore[index]
    assert outbox_entries == len(before["outbox"])  # type: ignore[arg-type]
    assert await snapshot(rt, org) == before
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.available_pence == 3_800 - reservation.hold_pence and wallet.live_calls == 1


async def test_peek_of_an_org_redis_does_not_have_is_org_unknown(redis_rt: Runtime) -> None:
    assert await peek_org(redis_rt, "org-nowhere") == [Outcome.org_unknown, 0, 0, 0, 0, 0, 0]
    assert await read_wallet(redis_rt, "org-nowhere") is None
