"""Real Redis restarts (a server of the test's own, SIGKILLed), not just deleted keys."""

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import EmbeddedRedis
from credit_engine.engine.holds import live_holds, reserve_call
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.reconciler import check
from credit_engine.engine.restore import ensure_rebuilt, state_present
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org


@pytest.fixture(params=[None, "always"], ids=["no-persistence", "aof-always"])
def own_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", appendfsync=request.param)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def restart_rt(own_redis: EmbeddedRedis, settings: Settings) -> AsyncIterator[Runtime]:
    runtime = await Runtime.open(replace(settings, redis_url=own_redis.url, redis_cluster=False, arq_redis_url=None))
    await ensure_rebuilt(runtime)
    yield runtime
    await runtime.close()


async def test_after_a_redis_crash_state_is_rebuilt_or_kept_and_nothing_is_doubled(
    restart_rt: Runtime, own_redis: EmbeddedRedis
) -> None:
    rt = restart_rt
    org = await new_org(rt, 10_000)
    for i in range(20):
        assert (await deduct_asset(rt, org, f"a{i}", 10)).outcome == Outcome.ok
    await reserve_call(rt, org, "live")
    await drain_org_fully(rt, org)
    for i in range(20, 25):  # acknowledged, still in the outbox when Redis dies
        assert (await deduct_asset(rt, org, f"a{i}", 10)).outcome == Outcome.ok

    own_redis.kill()  # SIGKILL: no shutdown, no final AOF rewrite
    own_redis.start()

    if own_redis.appendfsync == "always":
        # Every acknowledged write was fsynced before its reply: nothing is lost, no rebuild.
        assert await state_present(rt)
        wallet = await read_wallet(rt, org)
        assert wallet is not None and wallet.balance_pence == 10_000 - 250
        await drain_org_fully(rt, org)
        assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'asset'") == 25
    else:
        # No persistence: Redis comes back empty and is rebuilt from Postgres. The five
        # acknowledged debits that were still in the outbox are lost with it (the README says
        # so); everything Postgres had is back, including the live hold.
        assert not await state_present(rt)
        assert (await ensure_rebuilt(rt)).rebuilt_here
        wallet = await read_wallet(rt, org)
        assert wallet is not None and wallet.balance_pence == 10_000 - 200
        assert set(await live_holds(rt, org)) == {"live"}
        # A replay of a drained debit is still refused; a replay of a lost one is charged once.
        assert (await deduct_asset(rt, org, "a3", 10)).outcome == Outcome.replayed
        assert (await deduct_asset(rt, org, "a22", 10)).outcome == Outcome.ok
        await drain_org_fully(rt, org)
        assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'asset'") == 21
    assert (await check(rt, [org])).clean
