"""Clocks that disagree: two web processes, one two hours fast and one three hours slow, and a
worker one hour slow, against one Redis whose clock is right. Money decisions read Redis TIME only,
so a hold's expiry, the cost so far, the kill switch's moment and the readiness figures are right
whichever process answers.

The skew is libfaketime's (`apt-get install faketime`, which .ci/run does), a real shift of the
processes' C-level clocks. Without it, a Python-level shift of time.time()/time_ns() stands in for
the web processes, and the worker runs on the machine's clock: its scheduler (arq) files a cron
job at a datetime.now() moment and runs it by time.time(), two clocks the shim cannot shift
together (shifting one leaves every cron job an hour in the future, so no hold ever expires). The
test logs a warning when it runs without libfaketime.
"""

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.processes import cli as engine_command
from credit_engine.engine.runtime import Runtime
from tests.fake_vapi import FakeVapi, fake_vapi_server
from tests.processes import http_ready, service_env, stop, wait_for
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET
from tests.webapp.vapi_payloads import assistant_request, call, status_update

pytestmark = pytest.mark.faults

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
WORKER_SKEW_S = -3_600 if LIBFAKETIME.exists() else 0  # see the module's docstring
SHIM_DIR = Path(__file__).parent / "clock_shim"
VAPI = {"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"}


def skewed_env(settings: Settings, skew_s: int, **extra: str) -> dict[str, str]:
    env = service_env(
        settings,
        CREDIT_ENGINE_ADMIN_TOKEN=ADMIN_TOKEN,
        VAPI_WEBHOOK_SECRET=WEBHOOK_SECRET,
        CREDIT_ENGINE_KILL_WARN_LEAD_S="2",
        CREDIT_ENGINE_HOLD_REPORT_SLACK_S="1",
        **extra,
    )
    if LIBFAKETIME.exists():
        env |= {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME": f"{skew_s:+d}",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_RESET": "1",
        }
    else:
        env |= {
            "PYTHONPATH": f"{SHIM_DIR}{os.pathsep}{env.get('PYTHONPATH', '')}",
            "CREDIT_ENGINE_TEST_CLOCK_SKEW_S": str(skew_s),
        }
    return env


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(engine_command(*args), env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


@pytest.fixture
def fake_port() -> int:
    """The fake Vapi's port, chosen before the worker starts: its VAPI_CONTROL_BASE_URL."""
    return free_port()


@pytest.fixture
def processes(settings: Settings, tmp_path: Path, fake_port: int) -> Iterator[tuple[str, str]]:
    fast_port, slow_port = free_port(), free_port()
    fast = spawn(["serve", "--port", str(fast_port)], skewed_env(settings, +7_200), tmp_path / "fast.log")
    slow = spawn(["serve", "--port", str(slow_port)], skewed_env(settings, -10_800), tmp_path / "slow.log")
    if not LIBFAKETIME.exists():
        logging.getLogger(__name__).warning(
            "no libfaketime: the web processes' clocks shift in Python, the worker's not"
        )
    worker = spawn(
        ["worker"],
        skewed_env(settings, WORKER_SKEW_S, VAPI_CONTROL_BASE_URL=f"http://127.0.0.1:{fake_port}"),
        tmp_path / "worker.log",
    )
    try:
        yield f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{slow_port}"
    finally:
        codes = [stop(fast), stop(slow), stop(worker)]
        assert codes[2] == 0 and set(codes[:2]) <= {0, -15}, codes


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def test_holds_and_the_kill_switch_follow_redis_time_whatever_the_web_clocks_say(
    settings: Settings, processes: tuple[str, str], fake_port: int
) -> None:
    fast_url, slow_url = processes
    rt = await Runtime.open(settings)  # Redis TIME
    fast, slow = httpx.AsyncClient(base_url=fast_url, timeout=10), httpx.AsyncClient(base_url=slow_url, timeout=10)
    try:
        # Readiness compares the worker's heartbeat with "now": on Redis's clock both, so the
        # hours between these processes' clocks do not make the ledger look behind.
        await wait_for(lambda: http_ready(fast), 60, "the fast web process to be ready")
        await wait_for(lambda: http_ready(slow), 60, "the slow web process to be ready")
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        org = "clock-org"
        created = await fast.post(
            "/api/admin/orgs",
            headers=admin,
            json={
                "org_id": org,
                "name": "Clocks",
                "rate_pence_per_minute": 60,
                "min_start_pence": 10,
                "grace_seconds": 0,
            },
        )
        assert created.status_code == 201, created.text
        key = (await slow.post(f"/api/admin/orgs/{org}/api-keys", headers=admin)).json()["api_key"]
        topped = await slow.post(
            f"/api/admin/orgs/{org}/topups", headers=admin | {"Idempotency-Key": "t1"}, json={"amount_pence": 21}
        )
        assert topped.status_code == 201, topped.text
        number = "pn-clocks"
        registered = await fast.post(
            "/api/admin/phone-numbers",
            headers=admin,
            json={"vapi_phone_number_id": number, "org_id": org, "number": "+15550002222", "assistant_id": "a"},
        )
        assert registered.status_code == 201, registered.text
        auth = {"Authorization": f"Bearer {key}"}
        redis_now_s = (await rt.clock.now_ms(rt.redis)) / 1000

        async with fake_vapi_server(port=fake_port) as fake:
            # A call admitted by the fast process and started by the slow one.
            the_call = call("clock-call", phone_number_id=number, control_url=fake.control_url("clock-call"))
            answer = await fast.post("/api/vapi/webhook", content=assistant_request(the_call), headers=VAPI)
            assert "assistantOverrides" in answer.json(), answer.text
            started = time.monotonic()
            await slow.post("/api/vapi/webhook", content=status_update(the_call, "in-progress"), headers=VAPI)
            shown = (await fast.get("/api/calls/clock-call", headers=auth)).json()
            assert abs(_at(shown["started_at"]) - redis_now_s) < 30  # not hours away
            assert 0 < _at(shown["expires_at"]) - redis_now_s < 600
            checked = (
                await fast.post("/api/vapi/webhook/status-check", json={"call_id": "clock-call"}, headers=VAPI)
            ).json()
            assert checked["endCall"] is False and checked["call_cost_so_far_pence"] <= 1
            checked = (
                await slow.post("/api/vapi/webhook/status-check", json={"call_id": "clock-call"}, headers=VAPI)
            ).json()
            assert checked["endCall"] is False and checked["call_cost_so_far_pence"] <= 1
            # The worker (an hour slow) warns and ends the call on Redis's clock: 21p at 60p/min.
            await wait_for(lambda: _received(fake, 2), 40, "the warning and the end-call", interval_s=0.05)
            warned_s, ended_s = (at - started for at in fake.received_at[:2])
            assert [r.json["type"] for r in fake.received[:2]] == ["say", "end-call"]
            assert 16 <= warned_s <= 20.5, warned_s
            assert 18 <= ended_s <= 22.5, ended_s

        # A hold whose call never reported expires on Redis's clock too (funded seconds + 1 s slack).
        other = await fast.post(
            "/api/admin/orgs",
            headers=admin,
            json={"org_id": "clock-org-2", "name": "Clocks 2", "rate_pence_per_minute": 60, "min_start_pence": 5},
        )
        assert other.status_code == 201
        await slow.post(
            "/api/admin/orgs/clock-org-2/topups", headers=admin | {"Idempotency-Key": "t2"}, json={"amount_pence": 12}
        )
        key2 = (await fast.post("/api/admin/orgs/clock-org-2/api-keys", headers=admin)).json()["api_key"]
        reserved = await slow.post("/api/calls/silent/reserve", headers={"Authorization": f"Bearer {key2}"})
        assert reserved.status_code == 201, reserved.text
        reserved_at = time.monotonic()

        async def expired() -> bool:
            shown = (await fast.get("/api/calls/silent", headers={"Authorization": f"Bearer {key2}"})).json()
            return shown.get("status") not in (None, "live")

        await wait_for(expired, 40, "the silent hold to expire")
        assert 11 <= time.monotonic() - reserved_at <= 20  # 12 s funded + 1 s slack, swept every second
    finally:
        await fast.aclose()
        await slow.aclose()
        await rt.close()


async def _received(fake: FakeVapi, count: int) -> bool:
    return len(fake.received) >= count
