"""The crash matrix: for each of web app, worker, Redis and Postgres, SIGKILL it (Postgres with
every backend, as a power cut would) at random moments during a steady mixed load, bring it back,
let the system settle, then check that every accepted operation is in the ledger exactly once and
that the ledger, Postgres' projection and Redis agree (`credit-engine reconcile --check` exits 0).

CREDIT_ENGINE_CRASH_RUNS seeded runs per component (20 by default; CI runs 20). Each run prints
one line; with CREDIT_ENGINE_FAULTS_REPORT=<file.jsonl> it also appends its figures there, which
is where docs/reliability.md's table comes from.
"""

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass

import httpx
import pytest

from credit_engine.engine.runtime import Runtime
from tests.faults.deployment import ADMIN_TOKEN, COMPONENTS, WEBHOOK_SECRET, Deployment
from tests.faults.mixed_load import ISSUED_API_KEYS, MixedLoad
from tests.faults.settle import oldest_outbox_age_ms, reconcile_cli_exit_code, verify
from tests.processes import wait_for
from tests.services import postgres_data_dir

pytestmark = [pytest.mark.faults, pytest.mark.crash]

RUNS = int(os.environ.get("CREDIT_ENGINE_CRASH_RUNS", "20"))
USERS = 6
LOAD_S = 5.0


@dataclass
class RunResult:
    component: str
    seed: int
    held: bool
    kills: int
    operations: int
    retries: int
    worst_outbox_lag_ms: int
    seconds: float
    problems: list[str]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Holds expire after minutes, far beyond a run. The worker sweeps quickly so that lost doorbells
    # are found fast, and a provision whose process died mid-purchase may be retried after 3 s, not 60.
    with postgres_data_dir() as postgres_dir:
        deployed = Deployment(
            tmp_path_factory.mktemp("faults"),
            postgres_dir=postgres_dir,
            CREDIT_ENGINE_WORKER_SWEEP_INTERVAL_S="2",
            CREDIT_ENGINE_WORKER_EXPIRE_INTERVAL_S="1",
            CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S="3",
        )
        deployed.start()
        yield deployed
        deployed.stop()


last_readyz: list[str] = []


async def _ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as client:
            response = await client.get("/readyz")
            last_readyz[:] = [response.text]
            return response.status_code == 200 and response.json()["degraded"] == []  # the worker too
    except httpx.TransportError as error:
        last_readyz[:] = [repr(error)]
        return False


async def _faults(deployment: Deployment, component: str, rng: random.Random, stop: asyncio.Event) -> int:
    """Kill the component at random moments while the load runs; bring it back after a random outage."""
    kills = 0
    await asyncio.sleep(rng.uniform(0.3, 1.2))
    while not stop.is_set():
        await deployment.kill_soon(component)
        kills += 1
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        await deployment.restart_soon(component)
        await asyncio.sleep(rng.uniform(0.8, 2.0))
    return kills


async def _watch_lag(rt: Runtime, org_ids: list[str], stop: asyncio.Event) -> int:
    worst = 0
    while not stop.is_set():
        try:
            worst = max(worst, await oldest_outbox_age_ms(rt, org_ids))
        except Exception:  # Redis may be the part that is down
            pass
        await asyncio.sleep(0.1)
    return worst


async def one_run(
    deployment: Deployment,
    component: str,
    seed: int,
    load_s: float = LOAD_S,
    faults: "Callable[[asyncio.Event], Awaitable[int]] | None" = None,
) -> RunResult:
    started = time.monotonic()
    rng = random.Random(seed)
    rt = await Runtime.open(deployment.settings)
    load = MixedLoad(deployment.url, seed)
    try:
        try:
            await wait_for(lambda: _ready(deployment.url), 60, "the deployment to be ready")
        except AssertionError as error:
            raise AssertionError(f"{error}: /readyz said {last_readyz}\n{deployment.logs()[-3000:]}") from None
        await load.make_orgs(3)
        org_ids = [org.org_id for org in load.orgs]
        stop_load, stop_watch = asyncio.Event(), asyncio.Event()
        users = [asyncio.create_task(load.user(i, stop_load)) for i in range(USERS)]
        watcher = asyncio.create_task(_watch_lag(rt, org_ids, stop_watch))
        faulting = asyncio.create_task(faults(stop_load) if faults else _faults(deployment, component, rng, stop_load))
        await asyncio.sleep(load_s)
        stop_load.set()
        kills = await faulting  # the last outage has ended: the component is back
        operations = sum(await asyncio.gather(*users))
        verdict = await verify(rt, load.orgs, deployment.settings.phone_number_pence)
        stop_watch.set()
        worst_lag_ms = await watcher
        code, output = await asyncio.to_thread(reconcile_cli_exit_code, rt)
        if code != 0:
            verdict.problems.append(f"reconcile --check exited {code}: {output}")
        return RunResult(
            component,
            seed,
            verdict.held,
            kills,
            operations,
            load.retries,
            worst_lag_ms,
            round(time.monotonic() - started, 1),
            verdict.problems,
        )
    finally:
        await load.close()
        await rt.close()


@pytest.mark.timeout(60 * RUNS + 300)  # each run takes seconds, a slow settle up to a minute
@pytest.mark.parametrize("component", COMPONENTS)
async def test_killed_at_random_moments_every_accepted_operation_lands_once(
    deployment: Deployment, component: str
) -> None:
    results = []
    for run in range(RUNS):
        result = await one_run(deployment, component, seed=1000 * (COMPONENTS.index(component) + 1) + run)
        results.append(result)
        print(
            f"crash {component} seed {result.seed}: {'held' if result.held else 'FAILED'}, {result.kills} kills, "
            f"{result.operations} ops, {result.retries} retries, worst lag {result.worst_outbox_lag_ms} ms, "
            f"{result.seconds} s {result.problems or ''}"
        )
        report = os.environ.get("CREDIT_ENGINE_FAULTS_REPORT")
        if report:
            with open(report, "a") as out:
                out.write(json.dumps(asdict(result)) + "\n")
    failed = [r for r in results if not r.held]
    assert not failed, "\n".join(f"seed {r.seed}: {r.problems}" for r in failed) + "\n" + deployment.logs()[-5000:]


async def test_no_secret_is_ever_in_the_logs(deployment: Deployment) -> None:
    """After every crash above (tracebacks, retries, restarts, at INFO level): the admin token, the
    webhook secret and every org API key issued never appear in the web app's or worker's logs."""
    if not ISSUED_API_KEYS:  # run alone: make some traffic of our own first
        await one_run(deployment, "web", seed=99)
    logs = deployment.logs()
    assert len(logs) > 10_000  # there is something to search
    for secret in [ADMIN_TOKEN, WEBHOOK_SECRET, *ISSUED_API_KEYS]:
        assert secret not in logs
        assert secret[-16:] not in logs  # nor a recognisable part of it


@pytest.mark.timeout(600)
async def test_a_30_second_postgres_outage_under_load(deployment: Deployment) -> None:
    """Decisions go on from Redis while Postgres is away for 30 s; /readyz stays 200 (the web process
    can decide) and reports Postgres unreachable and the lag in its body; afterwards everything drains with no duplicate and no gap (the same checks as above)."""
    seen: list[dict[str, object]] = []

    async def outage(stop: asyncio.Event) -> int:
        await asyncio.sleep(1.0)
        await deployment.kill_soon("postgres")
        async with httpx.AsyncClient(base_url=deployment.url, timeout=5) as client:
            for _ in range(30):
                await asyncio.sleep(1.0)
                try:
                    response = await client.get("/readyz")
                    answer = response.json()
                    seen.append({"status": response.status_code, "degraded": answer["degraded"], **answer["checks"]})
                except httpx.TransportError:
                    pass
        await deployment.restart_soon("postgres")
        return 1

    result = await one_run(deployment, "postgres-30s", seed=77, load_s=32.0, faults=outage)
    print(
        f"postgres 30 s outage: {'held' if result.held else 'FAILED'}, {result.operations} ops, "
        f"worst lag {result.worst_outbox_lag_ms} ms, {result.seconds} s"
    )
    report = os.environ.get("CREDIT_ENGINE_FAULTS_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps(asdict(result)) + "\n")
    assert result.held, result.problems
    assert result.worst_outbox_lag_ms > 20_000  # the outbox really held the decisions while Postgres was away
    assert seen and all(s["status"] == 200 and str(s["postgres"]).startswith("unreachable") for s in seen)
    assert all("postgres" in s["degraded"] for s in seen)  # type: ignore[operator]
    assert result.operations > 50  # the load went on: calls were admitted and billed from Redis
