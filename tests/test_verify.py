"""`credit-engine verify` against real servers: all ticks on a healthy deployment, and a cross
naming the cause for each thing broken on purpose."""

import json
import subprocess
from dataclasses import replace
from pathlib import Path

from credit_engine.engine import processes, schema
from credit_engine.engine.embedded import free_port
from credit_engine.engine.restore import ensure_rebuilt
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org
from tests.processes import arq_health_check, service_env, start_worker, stop, wait_for


def run_verify(settings, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        processes.cli("verify", *args), env=service_env(settings), capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout + done.stderr


async def test_the_shipped_schema_is_exactly_what_the_migrations_make(rt: Runtime) -> None:
    async with rt.pg.acquire() as conn:
        have = await schema.describe(conn)
    assert have == schema.expected()
    assert schema.differences(schema.expected(), have) == []


async def _heartbeat(rt: Runtime) -> bool:
    return bool(await rt.redis.hexists(rt.keys.worker_stats, "heartbeat_ms"))


async def test_verify_ticks_everything_on_a_healthy_deployment_and_crosses_what_is_broken(
    rt: Runtime, tmp_path: Path
) -> None:
    await ensure_rebuilt(rt)
    orgs = [await new_org(rt, 1_000 * (i + 1)) for i in range(3)]
    worker = start_worker(rt.settings, tmp_path / "worker.log")
    try:
        await wait_for(lambda: _heartbeat(rt), 30, "the worker's first heartbeat")
        await wait_for(lambda: _arq_alive(rt), 30, "the worker's health check")
        code, output = run_verify(rt.settings)
        assert code == 0, output
        # No public URL here: a warning that calls may bypass the engine, not a failure.
        assert output.count("✓") == 8 and "✗" not in output and "10/10 checks passed (2 with a warning)" in output
        assert "! vapi routing" in output and "CREDIT_ENGINE_PUBLIC_URL is not set" in output
        # No VAPI_API_KEY here: silent holds are not settled from Vapi's records, and it says so.
        assert "! vapi records" in output and "VAPI_API_KEY is not set" in output
        code, output = run_verify(rt.settings, "--json")
        report = json.loads(output)
        assert (
            code == 0
            and report["ok"]
            and {c["name"] for c in report["checks"]}
            >= {
                "redis reachable",
                "postgres reachable",
                "schema at head",
                "lua scripts",
                "redis state",
                "worker alive",
                "outbox lag",
                "redis = postgres",
                "vapi routing",
                "vapi records",
            }
        )

        # Break three things: an index, one org's balance in Redis, and the worker.
        async with rt.pg.acquire() as conn:
            await conn.execute("DROP INDEX pending_credits_ix_created_at")
        await rt.redis.hincrby(rt.keys.org(orgs[1]).org, "balance_pence", 7)
    finally:
        assert stop(worker) == 0
    await arq_health_check(rt.settings, delete=True)
    code, output = run_verify(rt.settings, "--json")
    assert code == 1, output
    failed = {c["name"]: c["detail"] for c in json.loads(output)["checks"] if not c["ok"]}
    assert set(failed) == {"schema at head", "worker alive", "redis = postgres"}, failed
    assert "pending_credits_ix_created_at" in failed["schema at head"]
    assert orgs[1] in failed["redis = postgres"]


async def test_verify_reports_an_unreachable_redis_and_still_checks_postgres(rt: Runtime) -> None:
    nowhere = replace(rt.settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    code, output = run_verify(nowhere)
    assert code == 1
    lines = {line[2:].split("  ")[0].strip(): line[0] for line in output.splitlines() if line[:1] in "✓✗"}
    assert lines["redis reachable"] == "✗" and lines["postgres reachable"] == "✓" and lines["schema at head"] == "✓"


async def _arq_alive(rt: Runtime) -> bool:
    return await arq_health_check(rt.settings)
