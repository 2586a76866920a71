"""The API as a real server: `credit-engine serve` (uvicorn) and `credit-engine worker` as processes,
driven over real HTTP; and schemathesis against its /openapi.json, looking for any 5xx and for any
answer its response schemas (closed: no undocumented field) do not allow."""

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from tests.fake_vapi_api import API_KEY, FakeVapiApi
from tests.processes import deployment_ready, service_env, start_worker, stop, wait_for
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update


@dataclass
class Server:
    url: str
    settings: Settings


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET)


@pytest.fixture
def vapi_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """A test that asks for the fake Vapi API (before `server`) gets a server that uses it, and
    names itself as calls' server (POST /api/calls places no call without it)."""
    if "vapi_api" not in request.fixturenames:
        return {}
    fake = request.getfixturevalue("vapi_api")
    return {
        "VAPI_API_KEY": API_KEY,
        "VAPI_BASE_URL": fake.base_url,
        "CREDIT_ENGINE_PUBLIC_URL": "https://credit.example.com",
    }


@pytest.fixture
def server(server_settings: Settings, tmp_path: Path, vapi_env: dict[str, str]) -> Iterator[Server]:
    port = free_port()
    env = service_env(
        server_settings, CREDIT_ENGINE_ADMIN_TOKEN=ADMIN_TOKEN, VAPI_WEBHOOK_SECRET=WEBHOOK_SECRET, **vapi_env
    )
    with open(tmp_path / "web.log", "ab") as log:
        web = subprocess.Popen(
            processes.cli("serve", "--port", str(port)), env=env, stdout=log, stderr=subprocess.STDOUT
        )
    worker = start_worker(server_settings, tmp_path / "worker.log")
    try:
        yield Server(f"http://127.0.0.1:{port}", server_settings)
    finally:
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -SIGTERM is its clean exit.
        assert stop(web) in (0, -signal.SIGTERM), (tmp_path / "web.log").read_text()[-3000:]
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await wait_for(lambda: deployment_ready(client), 30, "the server and worker to be ready")
        yield client


async def test_a_call_from_start_to_bill_over_real_http(http: httpx.AsyncClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    vapi = {"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"}
    assert (
        await http.post(
            "/api/admin/orgs", json={"org_id": "acme", "name": "Acme", "rate_pence_per_minute": 60}, headers=admin
        )
    ).status_code == 201
    key = (await http.post("/api/admin/orgs/acme/api-keys", headers=admin)).json()["api_key"]
    org = {"Authorization": f"Bearer {key}"}
    topped = await http.post(
        "/api/admin/orgs/acme/topups", json={"amount_pence": 2000}, headers=admin | {"Idempotency-Key": "t1"}
    )
    assert topped.json()["balance_pence"] == 2000
    bought = await http.post(
        "/api/managed-telephony/provision",
        json={"area_code": "415", "assistant_id": "asst-1"},
        headers=org | {"Idempotency-Key": "n1"},
    )
    assert bought.status_code == 201
    number = bought.json()["phone_number"]["id"]
    the_call = call("real-call-1", phone_number_id=number)
    answer = await http.post("/api/vapi/webhook", content=assistant_request(the_call), headers=vapi)
    assert answer.json()["assistantOverrides"]["maxDurationSeconds"] == 1000
    await http.post("/api/vapi/webhook", content=status_update(the_call, "in-progress"), headers=vapi)
    decision = (await http.post("/api/vapi/webhook/status-check", json={"call_id": "real-call-1"}, headers=vapi)).json()
    assert (decision["endCall"], decision["reason"], decision["available_pence"]) == (False, "ok", 700)
    await http.post("/api/vapi/webhook", content=end_of_call_report(the_call, 125), headers=vapi)
    wallet = (await http.get("/api/wallet", headers=org)).json()
    assert (wallet["balance_pence"], wallet["held_pence"]) == (2000 - 1000 - 125, 0)

    async def drained() -> bool:
        items = (await http.get("/api/wallet/transactions", headers=org)).json()["items"]
        return [i["kind"] for i in items] == ["call_charge", "asset", "topup"]

    await wait_for(drained, 30, "the worker to write the ledger")  # the real worker, not a test helper
    items = (await http.get("/api/wallet/transactions", headers=org)).json()["items"]
    assert [i["balance_after_pence"] for i in items] == [875, 1000, 2000]
    assert "credit_engine_decisions_total" in (await http.get("/metrics")).text


async def test_schemathesis_finds_no_server_error(
    vapi_api: FakeVapiApi, http: httpx.AsyncClient, server: Server, tmp_path: Path
) -> None:
    """With a Vapi API to place calls at (a fake: POST /api/calls answers 503 without one)."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await http.post(
        "/api/admin/orgs", json={"org_id": "fuzz", "name": "Fuzz", "rate_pence_per_minute": 60}, headers=admin
    )
    key = (await http.post("/api/admin/orgs/fuzz/api-keys", headers=admin)).json()["api_key"]
    await http.post(
        "/api/admin/orgs/fuzz/topups", json={"amount_pence": 10**9}, headers=admin | {"Idempotency-Key": "f"}
    )
    # Once as the admin, once as an org; the Vapi secret rides along both times.
    for token in (ADMIN_TOKEN, key):
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                "25",
                "--seed",
                "2026",
                "-H",
                f"Authorization: Bearer {token}",
                "-H",
                f"X-Vapi-Secret: {WEBHOOK_SECRET}",
                "--request-timeout",
                "10",
                "--suppress-health-check",
                "all",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
