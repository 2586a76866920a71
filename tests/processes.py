"""Real worker and web processes for tests that kill them."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from credit_engine.engine import processes
from credit_engine.engine.config import Settings
from credit_engine.engine.keys import Keyspace

if TYPE_CHECKING:
    import httpx


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    assert settings.redis_url is not None and settings.database_url is not None
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "CREDIT_ENGINE_REDIS_CLUSTER": "1" if settings.redis_cluster else "0",
        "CREDIT_ENGINE_ARQ_REDIS_URL": settings.arq_redis_url or "",
        "CREDIT_ENGINE_KEY_PREFIX": settings.key_prefix,
        "CREDIT_ENGINE_LOG_LEVEL": "WARNING",
        "CREDIT_ENGINE_WORKER_EXPIRE_INTERVAL_S": "1",
        "CREDIT_ENGINE_WORKER_SWEEP_INTERVAL_S": "2",
        "CREDIT_ENGINE_WORKER_METRICS_PORT": "0",  # many workers at once: a test that wants it gives a port
        **extra,
    }


def start_worker(
    settings: Settings, log_path: Path, *, wrapper: str | None = None, **extra_env: str
) -> subprocess.Popen[bytes]:
    """The installed `credit-engine worker`, or `python -m <wrapper> worker`: a test's module
    (tests.…, found from the checkout's root) wrapped around the command."""
    command = processes.cli("worker") if wrapper is None else [sys.executable, "-m", wrapper, "worker"]
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command,
            env=service_env(settings, **extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


def kill(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    return process.wait(30)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    code = process.wait(timeout_s)
    log_path = getattr(process, "log_path", None)
    if code != 0 and log_path is not None:  # shown by pytest beside the failed assertion
        print(
            f"--- {log_path} (exit {code}) ---\n{Path(log_path).read_text(errors='replace')[-4000:]}", file=sys.stderr
        )
    return code


async def http_ready(client: "httpx.AsyncClient") -> bool:
    """A web process answers /readyz with 200 (a refused connection is just not ready yet)."""
    import httpx

    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def deployment_ready(client: "httpx.AsyncClient") -> bool:
    """/readyz says 200 and nothing degraded: Postgres answers and a worker keeps the ledger up to
    date (readiness alone says only that the web process can decide)."""
    import httpx

    try:
        answer = await client.get("/readyz")
    except httpx.TransportError:
        return False
    return answer.status_code == 200 and answer.json()["degraded"] == []


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def arq_health_check(settings: Settings, *, delete: bool = False) -> bool:
    """Is arq's health-check key in arq's Redis (not the engine's, on a cluster)? `delete` removes
    it first (a killed worker leaves it behind), so the next True is a new worker's."""
    redis = Redis.from_url(settings.arq_url)
    key = Keyspace(settings.key_prefix).arq_queue + ":health-check"
    try:
        if delete:
            await redis.delete(key)
        return bool(await redis.exists(key))
    finally:
        await redis.aclose()
