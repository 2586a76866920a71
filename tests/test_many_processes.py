"""Many processes: the seed's concurrent scenarios against one web process and one worker, and
against two web processes and two workers on the same Redis and Postgres, with every request
spread over the web processes. Both give exactly the one-process answer: the same refusals, the
same ledger, every entry written once (two workers never write one twice nor skip one)."""

import asyncio
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.runtime import Runtime
from tests.processes import http_ready, service_env, start_worker, stop, wait_for
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

VAPI = {"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(params=[1, 2], ids=["1-web-1-worker", "2-webs-2-workers"])
def urls(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[list[str]]:
    count = request.param
    env = service_env(settings, CREDIT_ENGINE_ADMIN_TOKEN=ADMIN_TOKEN, VAPI_WEBHOOK_SECRET=WEBHOOK_SECRET)
    ports = [free_port() for _ in range(count)]
    webs = []
    for i, port in enumerate(ports):
        with open(tmp_path / f"web-{i}.log", "ab") as log:
            webs.append(
                subprocess.Popen(
                    processes.cli("serve", "--port", str(port)), env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    workers = [start_worker(settings, tmp_path / f"worker-{i}.log") for i in range(count)]
    try:
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        codes = [stop(p) for p in webs] + [stop(w) for w in workers]
        assert all(code in (0, -15) for code in codes[:count]) and all(code == 0 for code in codes[count:]), codes


class Spread:
    """Sends each request to the next web process in turn."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
        self.turn = 0

    def next(self) -> httpx.AsyncClient:
        self.turn += 1
        return self.clients[self.turn % len(self.clients)]

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


async def _org(spread: Spread, org_id: str, balance_pence: int) -> tuple[str, str]:
    created = await spread.next().post(
        "/api/admin/orgs", headers=ADMIN, json={"org_id": org_id, "name": org_id, "rate_pence_per_minute": 60}
    )
    assert created.status_code == 201, created.text
    key = (await spread.next().post(f"/api/admin/orgs/{org_id}/api-keys", headers=ADMIN)).json()["api_key"]
    topped = await spread.next().post(
        f"/api/admin/orgs/{org_id}/topups",
        headers=ADMIN | {"Idempotency-Key": "seed"},
        json={"amount_pence": balance_pence},
    )
    assert topped.status_code == 201
    number = f"pn-{org_id}"
    registered = await spread.next().post(
        "/api/admin/phone-numbers",
        headers=ADMIN,
        json={"vapi_phone_number_id": number, "org_id": org_id, "number": "+15550003333", "assistant_id": "a"},
    )
    assert registered.status_code == 201
    return key, number


async def test_the_seeds_concurrent_scenarios_give_the_one_process_answer(urls: list[str], settings: Settings) -> None:
    spread = Spread(urls)
    rt = await Runtime.open(settings)
    try:
        for client in spread.clients:
            await wait_for(lambda: http_ready(client), 60, "every web process and worker to be ready")
        # 100 concurrent purchases on credit for exactly 37.
        buyer_key, _ = await _org(spread, "buyer", 37_000)
        buys = await asyncio.gather(
            *[
                spread.next().post(
                    "/api/managed-telephony/provision",
                    json={"area_code": "415"},
                    headers={"Authorization": f"Bearer {buyer_key}", "Idempotency-Key": f"buy-{i}"},
                )
                for i in range(100)
            ]
        )
        assert Counter(r.status_code for r in buys) == {201: 37, 402: 63}
        # 50 identical admissions of one call at once: one hold.
        caller_key, number = await _org(spread, "caller", 100_000)
        same = call("same-call", phone_number_id=number)
        admissions = await asyncio.gather(
            *[spread.next().post("/api/vapi/webhook", content=assistant_request(same), headers=VAPI) for _ in range(50)]
        )
        assert all("assistantOverrides" in a.json() for a in admissions)

        # 40 calls, each message to whichever process is next, all calls at once.
        async def one_call(i: int) -> None:
            plain = call(f"call-{i}", phone_number_id=number)
            admitted = call(f"call-{i}", phone_number_id=number, org_hint="caller")
            assert (
                "assistantOverrides"
                in (
                    await spread.next().post("/api/vapi/webhook", content=assistant_request(plain), headers=VAPI)
                ).json()
            )
            await spread.next().post("/api/vapi/webhook", content=status_update(admitted, "in-progress"), headers=VAPI)
            checked = await spread.next().post(
                "/api/vapi/webhook/status-check", json={"call_id": f"call-{i}"}, headers=VAPI
            )
            assert checked.json()["endCall"] is False
            await spread.next().post("/api/vapi/webhook", content=end_of_call_report(admitted, 30 + i), headers=VAPI)

        await asyncio.gather(*[one_call(i) for i in range(40)])
        await spread.next().post(
            "/api/vapi/webhook",
            content=end_of_call_report(call("same-call", phone_number_id=number, org_hint="caller"), 100),
            headers=VAPI,
        )
        # 20 top-ups, each key sent twice at once.
        topups = await asyncio.gather(
            *[
                spread.next().post(
                    "/api/admin/orgs/caller/topups",
                    headers=ADMIN | {"Idempotency-Key": f"pay-{i % 10}"},
                    json={"amount_pence": 100 + i % 10},
                )
                for i in range(20)
            ]
        )
        assert {r.status_code for r in topups} <= {201, 409} and sum(r.status_code == 201 for r in topups) >= 10

        async def drained() -> bool:
            lengths = [await rt.redis.xlen(rt.keys.org(org).outbox) for org in ("buyer", "caller")]
            return sum(lengths) == 0

        await wait_for(drained, 60, "the workers to drain")
        rows = await rt.pg.fetch("SELECT org_id, kind, amount_pence, call_id FROM ledger_entries ORDER BY id")
        ledger = Counter((r["org_id"], r["kind"], r["amount_pence"], r["call_id"]) for r in rows)
        expected = Counter(
            {
                ("buyer", "topup", 37_000, None): 1,
                ("buyer", "asset", -1000, None): 37,
                ("caller", "topup", 100_000, None): 1,
                ("caller", "call_charge", -100, "same-call"): 1,
            }
        )
        for i in range(40):
            expected[("caller", "call_charge", -(30 + i), f"call-{i}")] = 1
        for i in range(10):
            expected[("caller", "topup", 100 + i, None)] = 1
        assert ledger == expected  # each once: none twice, none skipped
        assert await rt.pg.fetchval("SELECT count(*) FROM ledger_rejects") == 0
        for org, balance in (
            ("buyer", 0),
            ("caller", 100_000 - 100 - sum(30 + i for i in range(40)) + sum(100 + i for i in range(10))),
        ):
            shown = (
                await spread.next().get(
                    "/api/wallet", headers={"Authorization": f"Bearer {buyer_key if org == 'buyer' else caller_key}"}
                )
            ).json()
            assert (shown["balance_pence"], shown["held_pence"]) == (balance, 0), org
            assert await rt.pg.fetchval("SELECT balance_pence FROM org_balances WHERE org_id = $1", org) == balance
    finally:
        await spread.close()
        await rt.close()
