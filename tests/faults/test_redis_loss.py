"""Redis restarted with no persistence in the middle of live calls (real processes, a real SIGKILL).

While Redis is empty and being rebuilt, money decisions are refused (503, or a spoken refusal for
Vapi) or made on state restored from Postgres, never on a guess: no answer ever shows a balance
above what Postgres says, nor a wallet without the live calls' holds. Afterwards the live holds
are back and the calls bill once. Which acknowledged debits a Redis without persistence loses
(those not yet drained) is in the README's durability table; the crash matrix shows that AOF
`always` loses none.
"""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from credit_engine.engine.amounts import billed_seconds_from_ms, call_cost_pence
from credit_engine.engine.db import asyncpg_dsn
from tests.faults.deployment import WEBHOOK_SECRET, Deployment
from tests.faults.mixed_load import MixedLoad
from tests.processes import wait_for
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

pytestmark = pytest.mark.faults

VAPI = {"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"}


@pytest.fixture
def deployment(tmp_path_factory: pytest.TempPathFactory, pg_data_dir: Path) -> Iterator[Deployment]:
    deployed = Deployment(
        tmp_path_factory.mktemp("redis-loss"),
        redis_appendfsync=None,
        postgres_dir=pg_data_dir,
        CREDIT_ENGINE_WORKER_SWEEP_INTERVAL_S="1",
    )
    deployed.start()
    yield deployed
    deployed.stop()


async def _pg_balance(database_url: str, org_id: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return int(await conn.fetchval("SELECT balance_pence FROM org_balances WHERE org_id = $1", org_id))
    finally:
        await conn.close()


@pytest.mark.parametrize("postgres_too", [False, True], ids=["redis-lost", "redis-lost-while-postgres-down"])
async def test_redis_lost_mid_call_refuses_until_restored_then_resumes_with_the_holds(
    deployment: Deployment, postgres_too: bool
) -> None:
    assert deployment.settings.database_url is not None
    load = MixedLoad(deployment.url, seed=5)
    client = httpx.AsyncClient(base_url=deployment.url, timeout=10)
    try:
        await wait_for(lambda: _ready(client), 60, "the deployment")
        await load.make_orgs(1)
        org = load.orgs[0]
        auth = {"Authorization": f"Bearer {org.api_key}"}
        live = []
        for i in range(2):
            the_call = call(f"live-{i}", phone_number_id=org.number_id)
            answer = await client.post("/api/vapi/webhook", content=assistant_request(the_call), headers=VAPI)
            assert "assistantOverrides" in answer.json()
            admitted = call(f"live-{i}", phone_number_id=org.number_id, org_hint=org.org_id)
            await client.post("/api/vapi/webhook", content=status_update(admitted, "in-progress"), headers=VAPI)
            live.append(admitted)
        before = (await client.get("/api/wallet", headers=auth)).json()
        assert before["live_calls"] == 2 and before["held_pence"] > 0
        await wait_for(lambda: _drained(client, deployment), 30, "the outbox to drain")

        await deployment.kill_soon("redis")
        refusals, answers = 0, 0
        if postgres_too:
            answers, refusals = await _refused_with_nothing_to_restore_from(deployment, client, org.number_id, auth)
        else:
            await deployment.restart_soon("redis")  # empty: no persistence
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            wallet = await client.get("/api/wallet", headers=auth)
            probe = call(f"probe-{answers}", phone_number_id=org.number_id)
            admission = await client.post("/api/vapi/webhook", content=assistant_request(probe), headers=VAPI)
            answers += 1
            assert admission.status_code == 200  # Vapi always gets its 200
            assert wallet.status_code in (200, 503), wallet.text
            if wallet.status_code == 503:
                assert wallet.json()["error"]["code"] in ("state_restoring", "unavailable")
                refusals += 1
            else:
                shown = wallet.json()
                assert shown["balance_pence"] <= await _pg_balance(deployment.settings.database_url, org.org_id)
                assert shown["held_pence"] >= before["held_pence"]  # never a wallet without the live holds
                if shown["live_calls"] >= 2 and "assistantOverrides" in admission.json():
                    break  # resumed
            if "error" in admission.json():
                assert admission.json()["error"]  # a spoken sentence
                refusals += 1
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(
                f"decisions did not resume within 20 s: wallet {wallet.status_code} {wallet.text}, "
                f"admission {admission.text}\n{deployment.logs()[-4000:]}"
            )
        holds = (await client.get("/api/wallet/holds", headers=auth)).json()["items"]
        assert {"live-0", "live-1"} <= {h["call_id"] for h in holds}
        for admitted, seconds in zip(live, (61, 125)):
            await client.post("/api/vapi/webhook", content=end_of_call_report(admitted, seconds), headers=VAPI)
        for admitted, seconds in zip(live, (61, 125)):
            shown = (await client.get(f"/api/calls/{admitted.id}", headers=auth)).json()
            assert (shown["status"], shown["charged_pence"]) == (
                "committed",
                call_cost_pence(billed_seconds_from_ms(seconds * 1000), 60),
            )
        print(f"redis loss: {answers} probes, {refusals} refused while restoring")
    finally:
        await client.aclose()
        await load.close()


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def _refused_with_nothing_to_restore_from(
    deployment: Deployment, client: httpx.AsyncClient, number_id: str, auth: dict[str, str]
) -> tuple[int, int]:
    """Postgres down too and Redis back empty, for 3 s: every answer must be a refusal, never a
    guess. Then Postgres comes back. Returns (answers, refusals)."""
    await deployment.kill_soon("postgres")
    await deployment.restart_soon("redis")  # empty: no persistence
    refusals, answers = 0, 0
    until = time.monotonic() + 3
    while time.monotonic() < until:
        wallet = await client.get("/api/wallet", headers=auth)
        probe = call(f"dark-{answers}", phone_number_id=number_id)
        admission = await client.post("/api/vapi/webhook", content=assistant_request(probe), headers=VAPI)
        answers += 1
        assert wallet.status_code == 503 and wallet.json()["error"]["code"] in ("state_restoring", "unavailable")
        assert admission.status_code == 200 and set(admission.json()) == {"error"} and admission.json()["error"]
        refusals += 2
        await asyncio.sleep(0.1)
    await deployment.restart_soon("postgres")
    return answers, refusals


async def _drained(client: httpx.AsyncClient, deployment: Deployment) -> bool:
    from credit_engine.engine.runtime import Runtime

    rt = await Runtime.open(deployment.settings)
    try:
        keys = [key async for key in rt.redis.scan_iter(match=f"{deployment.key_prefix}:*outbox*")]
        lengths = [await rt.redis.xlen(k) for k in keys if await rt.redis.type(k) == "stream"]
        return sum(lengths) == 0
    finally:
        await rt.close()


async def test_the_state_guard_outlives_postgres_starting_up(rt, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The web app's watch over Redis's state once died on asyncpg's CannotConnectNowError (Postgres
    starting up), leaving every decision refused for good. Now it keeps trying until the rebuild works."""
    from credit_engine.engine import restore
    from credit_engine.webapp import state

    calls = []

    async def flaky_rebuild(runtime):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) <= 2:
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        return await restore.ensure_rebuilt(runtime)

    monkeypatch.setattr(state, "ensure_rebuilt", flaky_rebuild)
    monkeypatch.setattr(state, "state_poll_interval_s", 0.02)
    guard = state.StateGuard(rt)
    await rt.redis.delete(rt.keys.state)  # Redis "lost its state"
    watcher = asyncio.create_task(guard.watch_forever())
    try:
        await wait_for(lambda: _ready_and_present(guard, rt), 10, "the guard to rebuild after Postgres came up")
        assert len(calls) >= 3 and not watcher.done()
    finally:
        watcher.cancel()


async def _ready_and_present(guard, rt) -> bool:  # type: ignore[no-untyped-def]
    return guard.ready and bool(await rt.redis.exists(rt.keys.state))
