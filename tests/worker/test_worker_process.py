"""The worker as a real process: it drains, expires, rebuilds, and survives SIGKILL exactly once."""

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.clock import ManualClock, RedisClock
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.holds import CallEvent, check_call, commit_call, reserve_call
from credit_engine.engine.reconciler import check
from credit_engine.engine.restore import state_present
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.conftest import delete_prefix
from tests.fake_vapi import FakeVapi, fake_vapi_server
from tests.helpers import new_org
from tests.processes import arq_health_check, kill, start_worker, stop, wait_for


async def worker_ready(rt: Runtime) -> bool:
    """arq writes its health-check key once the worker runs (after our on_startup)."""
    return await arq_health_check(rt.settings)


async def start_ready_worker(rt: Runtime, log: Path, **env: str):  # type: ignore[no-untyped-def]
    worker = start_worker(rt.settings, log, **env)
    await wait_for(lambda: worker_ready(rt), 30, "the worker to start")
    return worker


async def outboxes_empty(rt: Runtime, orgs: list[str]) -> bool:
    lengths = [await rt.redis.xlen(rt.keys.org(org).outbox) for org in orgs]
    return sum(lengths) == 0


async def make_traffic(rt: Runtime, orgs: list[str], operations: int, seed: int) -> int:
    """A mix of deductions, reserves, checks and commits. Returns how many ledger entries it made."""
    rng = random.Random(seed)
    entries = 0
    for i in range(operations):
        org = rng.choice(orgs)
        roll = rng.random()
        if roll < 0.5:
            result = await deduct_asset(rt, org, f"s{seed}-a{i}", rng.randint(1, 50))
            entries += result.outcome.name == "ok"
        elif roll < 0.75:
            await reserve_call(rt, org, f"s{seed}-c{i}")
            await check_call(rt, org, f"s{seed}-c{i}", CallEvent.start)
        else:
            result = await commit_call(rt, org, f"s{seed}-c{i - rng.randint(1, 20)}", rng.randint(1, 300))
            entries += result.outcome.name == "ok" and result.charged_pence > 0
    return entries


async def assert_ledger_exact(rt: Runtime, orgs: list[str], expected_redis_entries: int) -> None:
    """Every entry exactly once, and ledger = projection = Redis, for every org."""
    redis_first = await rt.pg.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE org_id = ANY($1::text[]) AND source = 'redis'", orgs
    )
    assert redis_first == expected_redis_entries
    for org in orgs:
        row = await rt.pg.fetchrow(
            """SELECT b.balance_pence, (SELECT sum(amount_pence) FROM ledger_entries WHERE org_id = $1) AS total
               FROM org_balances b WHERE org_id = $1""",
            org,
        )
        wallet = await read_wallet(rt, org)
        assert wallet is not None
        assert row["total"] == row["balance_pence"] == wallet.balance_pence
    # Judged by Redis's real clock, as the worker process (which pruned expired records by it) is:
    # the test's own ManualClock is in 2025, and by it every record the worker pruned would look
    # missing inside its window.
    test_clock, rt.clock = rt.clock, RedisClock()
    try:
        report = await check(rt, orgs)
    finally:
        rt.clock = test_clock
    assert report.clean, report.drifted


async def test_the_worker_drains_the_outbox(rt: Runtime, tmp_path: Path) -> None:
    orgs = [await new_org(rt, 100_000) for _ in range(3)]
    expected = await make_traffic(rt, orgs, 300, seed=1)
    worker = await start_ready_worker(rt, tmp_path / "worker.log")
    try:
        await wait_for(lambda: outboxes_empty(rt, orgs), 30, "the worker to drain")
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()
    await assert_ledger_exact(rt, orgs, expected)


@pytest.mark.parametrize(
    ("fault", "redelivers"),
    [
        # Right after the second ledger COMMIT, before deleting the batch from the streams:
        # the exact moment a crash must not duplicate.
        ("outbox.after_commit:2", True),
        # Inside the second batch's transaction, everything written, nothing committed: Postgres
        # rolls it back and the entries must still land, once.
        ("ledger.before_commit:2", False),
    ],
)
async def test_killed_mid_batch_every_entry_lands_once(
    rt: Runtime, tmp_path: Path, fault: str, redelivers: bool
) -> None:
    orgs = [await new_org(rt, 1_000_000) for _ in range(4)]
    expected = await make_traffic(rt, orgs, 2_000, seed=2)
    # One drain loop, so the crash point is exactly where the fault says (with two, the other
    # loop could be anywhere when this one dies).
    crashing = start_worker(
        rt.settings, tmp_path / "crash.log", CREDIT_ENGINE_FAULT=fault, CREDIT_ENGINE_WORKER_DRAIN_LOOPS="1"
    )
    assert crashing.wait(60) == -signal.SIGKILL
    assert not await outboxes_empty(rt, orgs)
    # One loop again: with two, the periodic sweep can hand an org to the second loop while the
    # first is writing it, and the second then finds those entries written (a harmless redelivery).
    worker = await start_ready_worker(rt, tmp_path / "worker.log", CREDIT_ENGINE_WORKER_DRAIN_LOOPS="1")
    try:
        await wait_for(lambda: outboxes_empty(rt, orgs), 60, "the restarted worker to drain")
        if redelivers:
            await wait_for(lambda: _published(rt), 5, "the worker's stats")
    finally:
        assert stop(worker) == 0
    stats = await rt.redis.hgetall(rt.keys.worker_stats)
    # After a committed-but-unacknowledged batch, its entries come back and are recognised;
    # after a rolled-back one, they are simply written.
    assert (int(stats["entries_redelivered"]) > 0) == redelivers
    assert int(stats["entries_duplicate"]) == 0
    await assert_ledger_exact(rt, orgs, expected)


async def _published(rt: Runtime) -> bool:
    return int(await rt.redis.hget(rt.keys.worker_stats, "entries_redelivered") or 0) > 0


@pytest.mark.parametrize("seed", [11, 12])
async def test_killed_at_random_moments_under_traffic_every_entry_lands_once(
    rt: Runtime, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    orgs = [await new_org(rt, 1_000_000) for _ in range(4)]
    expected = 0
    for round_ in range(5):
        worker = start_worker(rt.settings, tmp_path / f"worker-{round_}.log")
        traffic = asyncio.create_task(make_traffic(rt, orgs, 400, seed=seed * 100 + round_))
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        kill(worker)  # SIGKILL, wherever it is: reading, mid-transaction, acknowledging
        expected += await traffic
    await arq_health_check(rt.settings, delete=True)  # left by killed workers
    worker = await start_ready_worker(rt, tmp_path / "worker-final.log")
    try:
        await wait_for(lambda: outboxes_empty(rt, orgs), 60, "the last worker to drain")
    finally:
        assert stop(worker) == 0
    await assert_ledger_exact(rt, orgs, expected)


async def test_the_worker_rebuilds_a_redis_that_lost_its_state(rt: Runtime, tmp_path: Path) -> None:
    org = await new_org(rt, 4321)
    assert rt.settings.redis_url is not None
    await delete_prefix(rt.settings.redis_url, rt.settings.key_prefix)
    worker = start_worker(rt.settings, tmp_path / "worker.log")
    try:
        await wait_for(lambda: state_present(rt), 30, "the worker to rebuild redis")
    finally:
        assert stop(worker) == 0
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 4321


async def test_a_sigterm_during_startup_stops_the_worker_once_started(rt: Runtime, tmp_path: Path) -> None:
    """A SIGTERM that lands while on_startup runs (here: as the first Redis command after the
    rebuild is written, tests/worker/sigterm_at_startup.py) ends the worker by itself, exit 0 and
    on_shutdown run. Its cancellation of arq's main() used to be lost there (Python 3.11's
    asyncio.wait_for inside redis-py): the worker started and ran on until killed, which made the
    rebuild test above fail about one run in seven. Nothing is left half done: Redis is rebuilt,
    the rebuild lock and arq's health-check key are gone, and the next worker starts and stops."""
    org = await new_org(rt, 4321)
    assert rt.settings.redis_url is not None
    await delete_prefix(rt.settings.redis_url, rt.settings.key_prefix)
    log = tmp_path / "worker.log"
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
    module = "tests.worker.sigterm_at_startup"
    worker = start_worker(rt.settings, log, wrapper=module, CREDIT_ENGINE_LOG_LEVEL="INFO", PYTHONPATH=pythonpath)
    try:
        code = worker.wait(20)  # no second signal: stop() would send one, and that one would be heard
    except subprocess.TimeoutExpired:
        code = None
    finally:
        kill(worker)
    text = log.read_text()
    assert "sigterm_at_startup: SIGTERM sent" in text, text
    assert code == 0, text
    assert "worker stopped" in text, text  # on_shutdown ran
    assert await state_present(rt)
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 4321
    assert not await rt.redis.exists(rt.keys.rebuild_lock)
    assert not await arq_health_check(rt.settings)
    worker = await start_ready_worker(rt, tmp_path / "next.log")
    assert stop(worker) == 0


async def test_the_worker_expires_a_hold_whose_call_never_reported(rt: Runtime, tmp_path: Path) -> None:
    org = await new_org(rt, 10_000)
    # A call reserved and started long ago (the test's clock is in 2025; the worker decides by
    # Redis's real clock), last seen 90 s in, then silence.
    assert isinstance(rt.clock, ManualClock)
    reservation = await reserve_call(rt, org, "lost-call")
    await check_call(rt, org, "lost-call", CallEvent.start)
    rt.clock.advance(90_000)
    await check_call(rt, org, "lost-call")
    worker = await start_ready_worker(rt, tmp_path / "worker.log")

    async def expired() -> bool:
        row = await rt.pg.fetchrow("SELECT status, charged_pence FROM call_holds WHERE call_id = 'lost-call'")
        return row is not None and row["status"] == "expired"

    try:
        await wait_for(expired, 30, "the expiry cron")
    finally:
        assert stop(worker) == 0
    row = await rt.pg.fetchrow("SELECT charged_pence, billed_seconds FROM call_holds WHERE call_id = 'lost-call'")
    assert (row["charged_pence"], row["billed_seconds"]) == (90, 90)  # up to the last known moment
    wallet = await read_wallet(rt, org)
    assert wallet is not None
    assert (wallet.balance_pence, wallet.held_pence) == (10_000 - 90, 0)
    assert reservation.hold_pence > 90


async def test_the_worker_process_warns_then_ends_a_call_on_redis_time(settings: Settings, tmp_path: Path) -> None:
    """The real worker process, on Redis's real clock: a call with 11 s of credit is warned 2 s
    before it runs out and ended when it does (grace 0), through a real HTTP control URL."""
    rt = await Runtime.open(settings)  # Redis TIME, as the worker
    try:
        org = await new_org(rt, 11, rate_pence_per_minute=60, min_start_pence=10, grace_seconds=0)
        async with fake_vapi_server() as fake:
            worker = await start_ready_worker(
                rt, tmp_path / "worker.log", CREDIT_ENGINE_KILL_WARN_LEAD_S="2", VAPI_CONTROL_BASE_URL=fake.base_url
            )
            try:
                assert (await reserve_call(rt, org, "live-call")).outcome == Outcome.ok
                await CallIndex(rt).remember("live-call", org, fake.control_url("live-call"))
                await check_call(rt, org, "live-call", CallEvent.start)
                started = time.monotonic()
                await wait_for(lambda: _received(fake, 2), 20, "the warning and the end-call", interval_s=0.02)
            finally:
                assert stop(worker) == 0
        warned_s, ended_s = (at - started for at in fake.received_at)
        assert [r.json["type"] for r in fake.received] == ["say", "end-call"]
        # Depletion at 11 s (the prediction may run up to a second early: whole seconds, and a
        # call counts from its reservation); the worker looks every 200 ms.
        assert 7.9 <= warned_s <= 9.8, warned_s
        assert 9.9 <= ended_s <= 11.8, ended_s
    finally:
        await rt.close()


async def _received(fake: FakeVapi, count: int) -> bool:
    return len(fake.received) >= count


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_the_worker_logs_json_lines_without_arqs_job_lines_at_info(
    rt: Runtime, tmp_path: Path, level: str
) -> None:
    """A real worker running its crons every second: at INFO its log holds no line per job (arq
    writes two per job, which drowned everything else); at DEBUG they are there, marked DEBUG.
    Every line is one JSON object a log shipper can parse."""
    log = tmp_path / "worker.log"
    worker = await start_ready_worker(rt, log, CREDIT_ENGINE_LOG_LEVEL=level, CREDIT_ENGINE_LOG_FORMAT="json")
    try:
        await asyncio.sleep(3.5)  # the expiry cron runs every second (tests/processes.py)
    finally:
        assert stop(worker) == 0, log.read_text()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in lines)
    job_lines = [
        line for line in lines if line["logger"] == "arq.worker" and ("→" in line["message"] or "←" in line["message"])
    ]
    started = [line for line in lines if line["message"].startswith("Starting worker")]
    assert started and started[0]["level"] == "INFO"  # arq's own start-up line is kept
    if level == "INFO":
        assert job_lines == []
    else:
        assert len(job_lines) >= 4 and {line["level"] for line in job_lines} == {"DEBUG"}


async def test_the_worker_serves_its_own_counters(rt: Runtime, tmp_path: Path) -> None:
    """The worker's /metrics counts what this worker wrote, as a Prometheus counter (so rate()
    works), where the web processes once republished it read back from Redis as a gauge."""
    orgs = [await new_org(rt, 100_000) for _ in range(2)]
    expected = await make_traffic(rt, orgs, 120, seed=5)
    port = free_port()
    worker = await start_ready_worker(rt, tmp_path / "worker.log", CREDIT_ENGINE_WORKER_METRICS_PORT=str(port))
    try:
        await wait_for(lambda: outboxes_empty(rt, orgs), 30, "the worker to drain")
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()
    assert "# TYPE credit_engine_worker_ledger_entries_written_total counter" in text
    written = re.search(r"^credit_engine_worker_ledger_entries_written_total (\S+)$", text, re.M)
    assert written is not None and float(written.group(1)) == expected
    await assert_ledger_exact(rt, orgs, expected)
