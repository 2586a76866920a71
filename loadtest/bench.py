"""`credit-engine bench`: every figure in docs/benchmarks.md, measured in one run on this machine.

1. The status check against two baselines, behind the same web stack (uvicorn, uvloop, httptools,
   one process each, one at a time): a bare endpoint doing one EVALSHA (the practical limit) and
   the seed's design (a PL/pgSQL function with SELECT ... FOR UPDATE). Saturation with wrk
   (requests/s, p50/p99), a fixed 2,000 requests/s with an open-loop generator (p50/p99), and a
   sweep of offered rates for the plot; one hot org, and 10,000 orgs. CPU of server, Redis or
   Postgres, and load generator, beside each figure. Before that, the status check and the bare
   endpoint side by side (both up, wrk runs taking turns): requests per CPU-second of each server
   process, and their ratio (target: the status check at >= 0.75x the bare endpoint).
2. The Lua decision: microseconds per call seen by a client, and inside Redis (INFO commandstats).
3. The reserve, commit and provision endpoints at a fixed rate: p50/p99.
4. The ledger writer (the real worker process): entries/s drained into Postgres, and the outbox lag
   (decided in Redis -> committed in Postgres) p99 under 2,000 money operations/s.
5. The reconciler: rebuilding 100,000 orgs with 1,000,000 ledger entries into an empty Redis.

Everything runs against private embedded servers in a temporary directory.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis.exceptions import RedisError

from credit_engine.engine import processes
from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.config import Settings
from credit_engine.engine.db import with_database
from credit_engine.engine.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, new_scratch_dir
from credit_engine.engine.holds import CallEvent, check_call, reserve_call
from credit_engine.engine.migrate import upgrade_to_head
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.restore import rebuild_all
from credit_engine.engine.runtime import Runtime
from credit_engine.loadtest.rate import RateResult, http_request, run_at_rate
from credit_engine.migrations.sql_statements import split_statements

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_post.lua"
ORGS_MANY = 10_000
saturation_repeats = 3  # the machine is shared and noisy: each saturation figure is a median
WEBHOOK_SECRET = "bench-" + "s" * 32
ADMIN_TOKEN = "bench-" + "a" * 32


@dataclass
class Durations:
    saturation_s: int = 5
    fixed_rate_s: int = 6
    sweep_point_s: int = 3
    endpoint_s: int = 5
    lag_run_s: int = 20
    ledger_entries: int = 100_000
    reconcile_orgs: int = 100_000
    reconcile_entries_per_org: int = 10
    side_by_side_rounds: int = 5
    side_by_side_s: int = 4

    @classmethod
    def quick(cls) -> "Durations":
        return cls(2, 2, 1, 2, 5, 20_000, 10_000, 10, 3, 2)


@dataclass
class Measured:
    design: str
    load: str
    mode: str  # saturation | fixed
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # share of one core
    store_cpu: float  # Redis or Postgres
    generator_cpu: float
    generator: str
    non_2xx: int = 0
    requests_per_cpu_s: float = 0.0  # requests answered per CPU-second of the server process


@dataclass
class SideBySide:
    """The status check and the bare endpoint at saturation, both servers up and their wrk runs
    taking turns (status, bare, status, ...), so the machine's other load falls on both alike.
    The figure is requests per CPU-second of each server process over each run: the share of a
    core each gets moves with what else runs, the CPU each request costs much less."""

    load: str
    seconds: int
    status_check_per_cpu_s: list[int]
    bare_per_cpu_s: list[int]
    status_check_rps: list[int]
    bare_rps: list[int]
    ratio: float = 0.0  # median status-check / median bare, requests per CPU-second
    round_ratios: list[float] = field(default_factory=list)


@dataclass
class Report:
    machine: dict[str, Any] = field(default_factory=dict)
    status_check: list[Measured] = field(default_factory=list)
    side_by_side: list[SideBySide] = field(default_factory=list)
    sweep: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    lua: dict[str, dict[str, float]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, float]] = field(default_factory=dict)
    ledger: dict[str, float] = field(default_factory=dict)
    reconcile: dict[str, float] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Servers --------------------------------------------------------------------------------------


class WebServer:
    """One web process at a time: the status check, the bare endpoint, or the seed's design."""

    def __init__(self, design: str, env: dict[str, str], data_dir: Path) -> None:
        self.design = design
        self.port = free_port()
        self.env = env
        self.log_path = data_dir / f"{design}.log"
        if design == "status-check":
            self.argv = processes.cli("serve", "--port", str(self.port))
        else:
            module = {
                "bare-evalsha": "credit_engine.loadtest.bare_app:app",
                "seed-for-update": "credit_engine.loadtest.seed_app:app",
            }[design]
            self.argv = [
                *processes.tool("uvicorn"),  # the installed package, never a checkout's folders
                module,
                "--port",
                str(self.port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "WebServer":
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.design} did not start; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


# Load generators ------------------------------------------------------------------------------

LATENCY_LINE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class WrkRun:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int
    generator_cpu_s: float
    server_cpu_s: float = 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.requests / max(self.server_cpu_s, 1e-9)


def wrk(url: str, bodies_file: Path, headers: str, seconds: int, connections: int = 32) -> WrkRun:
    """One wrk run at saturation."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            str(bodies_file),
        ],
        env={**os.environ, "WRK_HEADERS": headers},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    latencies = {pct: float(value) * UNIT_MS[unit] for pct, value, unit in LATENCY_LINE.findall(result.stdout)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", result.stdout).group(1))  # type: ignore[union-attr]
    non_2xx_match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", result.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    non_2xx = int(non_2xx_match.group(1)) if non_2xx_match else 0
    return WrkRun(rps, latencies["50"], latencies["99"], non_2xx, requests, cpu)


def saturate(server: "WebServer", url_path: str, bodies_path: Path, headers: dict[str, str], seconds: int) -> WrkRun:
    """One wrk run, with the server process's CPU seconds over it."""
    header_text = "|".join(f"{k}: {v}" for k, v in headers.items())
    before = cpu_seconds([server.pid])
    run = wrk(f"http://127.0.0.1:{server.port}{url_path}", bodies_path, header_text, seconds)
    run.server_cpu_s = cpu_seconds([server.pid]) - before
    return run


def bodies_file(bodies: list[bytes]) -> Path:
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as handle:
        handle.write(b"\n".join(bodies) + b"\n")
    return Path(handle.name)


def measure(
    design: str,
    load: str,
    server: WebServer,
    store_pids: list[int],
    url_path: str,
    bodies: list[bytes],
    headers: dict[str, str],
    mode: str,
    seconds: int,
    rate: float = 0,
) -> Measured:
    server_before = cpu_seconds([server.pid])
    store_before = cpu_seconds(store_pids)
    started = time.monotonic()
    if mode == "saturation":
        path = bodies_file(bodies)
        runs = sorted(
            (saturate(server, url_path, path, headers, seconds) for _ in range(saturation_repeats)),
            key=lambda run: run.rps,
        )
        median = runs[len(runs) // 2]  # the median run by requests/s
        rps, p50, p99, non_2xx = median.rps, median.p50_ms, median.p99_ms, median.non_2xx
        per_cpu_s = median.per_cpu_s
        generator_cpu = sum(run.generator_cpu_s for run in runs)
        os.unlink(path)
        generator = f"wrk -t1 -c32, median of {saturation_repeats}"
    else:
        host = f"127.0.0.1:{server.port}"
        requests = [
            http_request("POST", url_path, host, body, {"Content-Type": "application/json", **headers})
            for body in bodies
        ]
        server_before_run = cpu_seconds([server.pid])
        result = run_at_rate("127.0.0.1", server.port, lambda i: requests[i % len(requests)], rate, seconds)
        per_cpu_s = result.completed / max(cpu_seconds([server.pid]) - server_before_run, 1e-9)
        rps, p50, p99 = result.rate_achieved, result.percentile_ms(0.50), result.percentile_ms(0.99)
        non_2xx = sum(n for status, n in result.statuses.items() if status >= 300) + result.errors
        generator_cpu = result.generator_cpu_s
        generator = "open loop (uvloop), 64 conns"
    elapsed = time.monotonic() - started
    return Measured(
        design,
        load,
        mode,
        round(rps, 1),
        round(p50, 3),
        round(p99, 3),
        round((cpu_seconds([server.pid]) - server_before) / elapsed, 2),
        round((cpu_seconds(store_pids) - store_before) / elapsed, 2),
        round(generator_cpu / elapsed, 2),
        generator,
        non_2xx,
        round(per_cpu_s),
    )


# Data -----------------------------------------------------------------------------------------


async def seed_many_orgs(rt: Runtime, count: int) -> list[tuple[str, str]]:
    """`count` orgs with 10,000,000p each and one live call each, through the engine's own paths
    (set-based SQL for the orgs and their top-ups, the reconciler's rebuild into Redis, the
    scripts for the calls). Returns (org_id, call_id) pairs."""
    orgs = [(f"b{i:06d}", f"call-b{i:06d}") for i in range(count)]
    async with rt.pg.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO orgs (org_id, name, rate_pence_per_minute)
               SELECT 'b' || lpad(i::text, 6, '0'), 'bench', 60 FROM generate_series(0, $1 - 1) i""",
            count,
        )
        await conn.execute(
            """INSERT INTO org_balances (org_id) SELECT org_id FROM orgs WHERE org_id LIKE 'b%'""",
        )
        await conn.execute(
            """INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, balance_after_pence,
                   debt_after_pence, source, created_at)
               SELECT org_id, org_id || '/topup/bench', 'topup', 10000000, 10000000, 0, 'postgres', now()
               FROM orgs WHERE org_id LIKE 'b%'""",
        )
        await conn.execute(
            """UPDATE org_balances b SET balance_pence = 10000000, entry_count = 1, last_entry_id = l.id
               FROM ledger_entries l WHERE l.org_id = b.org_id AND b.org_id LIKE 'b%'""",
        )
    await rebuild_all(rt)
    for start in range(0, count, 500):
        chunk = orgs[start : start + 500]
        await asyncio.gather(*[reserve_call(rt, org, call) for org, call in chunk])
        await asyncio.gather(*[check_call(rt, org, call, CallEvent.start) for org, call in chunk])
        async with rt.redis.pipeline(transaction=False) as pipe:
            for org, call in chunk:  # what the web app remembers when it admits a call
                pipe.hset(f"{rt.keys.prefix}:call:{call}", "org_id", org)
            await pipe.execute()
    await drain_everything(rt)  # the calls' hold events: measurements start from empty outboxes
    return orgs


async def drain_everything(rt: Runtime) -> None:
    from credit_engine.worker.drainer import Drainer

    drainer = Drainer(rt)
    await drainer.sweep()
    while await drainer.drain_round():  # ends when no org is left rung
        pass


async def seed_the_seed_design(database_url: str, orgs: list[tuple[str, str]]) -> None:
    import asyncpg

    from credit_engine.loadtest.seed_app import SCHEMA

    conn = await asyncpg.connect(database_url)
    try:
        for statement in split_statements(SCHEMA):
            await conn.execute(statement)
        await conn.executemany("INSERT INTO seed_orgs VALUES ($1, 10000000, 300, 60)", [(org,) for org, _ in orgs])
        await conn.executemany(
            "INSERT INTO seed_reservations VALUES ($1, $2, 300, now())", [(call, org) for org, call in orgs]
        )
    finally:
        await conn.close()


# Sections -------------------------------------------------------------------------------------


# The status check's designs: URL path, headers, whether the body names the call only (the
# status check finds its org; the baselines are told it), and whose CPU is the store's.
DESIGNS: dict[str, tuple[str, dict[str, str], bool, str]] = {
    "status-check": ("/api/vapi/webhook/status-check", {"X-Vapi-Secret": WEBHOOK_SECRET}, True, "redis"),
    "bare-evalsha": ("/check", {}, False, "redis"),
    "seed-for-update": ("/check", {}, False, "postgres"),
}


def status_bodies(pairs: list[tuple[str, str]], call_only: bool) -> list[bytes]:
    return [
        json.dumps({"call_id": call} if call_only else {"org_id": org, "call_id": call}).encode() for org, call in pairs
    ]


def status_loads(orgs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    return {"one hot org": [orgs[0]], f"{len(orgs):,} orgs": orgs}


def warm_up(design: str, load: str, server: "WebServer", bodies: list[bytes]) -> None:
    path, headers, _, _ = DESIGNS[design]
    warm = measure(design, load, server, [], path, bodies, headers, "fixed", 2, rate=min(5000, len(bodies)))
    assert warm.non_2xx == 0, f"{design} answered non-2xx while warming up"


def side_by_side_section(
    report: Report, env: dict[str, str], data_dir: Path, orgs: list[tuple[str, str]], d: Durations
) -> None:
    """The status check's CPU per request against the bare endpoint's (SideBySide)."""
    names = ("status-check", "bare-evalsha")
    with WebServer(names[0], env, data_dir) as ours, WebServer(names[1], env, data_dir) as bare:
        servers = dict(zip(names, (ours, bare), strict=True))
        for load, pairs in status_loads(orgs).items():
            files = {}
            for name, server in servers.items():
                bodies = status_bodies(pairs, DESIGNS[name][2])
                warm_up(name, load, server, bodies)
                files[name] = bodies_file(bodies)
            log(f"side by side, {load}: {d.side_by_side_rounds} rounds of {d.side_by_side_s}s each")
            runs: dict[str, list[WrkRun]] = {name: [] for name in names}
            for _ in range(d.side_by_side_rounds):
                for name, server in servers.items():
                    run = saturate(server, DESIGNS[name][0], files[name], DESIGNS[name][1], d.side_by_side_s)
                    assert run.non_2xx == 0, f"{name} answered non-2xx at saturation"
                    runs[name].append(run)
            for path in files.values():
                os.unlink(path)
            report.side_by_side.append(compare(load, d.side_by_side_s, runs[names[0]], runs[names[1]]))


def compare(load: str, seconds: int, ours: list[WrkRun], bare: list[WrkRun]) -> SideBySide:
    ours_per_cpu = [round(run.per_cpu_s) for run in ours]
    bare_per_cpu = [round(run.per_cpu_s) for run in bare]
    result = SideBySide(
        load,
        seconds,
        ours_per_cpu,
        bare_per_cpu,
        [round(run.rps) for run in ours],
        [round(run.rps) for run in bare],
        round(statistics.median(ours_per_cpu) / statistics.median(bare_per_cpu), 3),
        [round(a / b, 3) for a, b in zip(ours_per_cpu, bare_per_cpu, strict=True)],
    )
    log(
        f"side by side, {load}: status check {statistics.median(ours_per_cpu):,.0f} requests per CPU-second, "
        f"bare {statistics.median(bare_per_cpu):,.0f}: {result.ratio:.3f}x (rounds {result.round_ratios})"
    )
    return result


def status_check_section(
    report: Report,
    env: dict[str, str],
    data_dir: Path,
    orgs: list[tuple[str, str]],
    store_pids: dict[str, list[int]],
    d: Durations,
) -> None:
    for design, (path, headers, call_only, store_name) in DESIGNS.items():
        store = store_pids[store_name]
        with WebServer(design, env, data_dir) as server:
            for load, pairs in status_loads(orgs).items():
                bodies = status_bodies(pairs, call_only)
                warm_up(design, load, server, bodies)
                log(f"{design}, {load}: saturation")
                report.status_check.append(
                    measure(design, load, server, store, path, bodies, headers, "saturation", d.saturation_s)
                )
                log(f"{design}, {load}: 2,000 requests/s")
                report.status_check.append(
                    measure(design, load, server, store, path, bodies, headers, "fixed", d.fixed_rate_s, 2000)
                )
            bodies = status_bodies(orgs, call_only)
            points = []
            for rate in (500, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000):
                point = measure(design, "sweep", server, store, path, bodies, headers, "fixed", d.sweep_point_s, rate)
                points.append({"offered": rate, "achieved": point.rps, "p50_ms": point.p50_ms, "p99_ms": point.p99_ms})
                log(f"{design} at {rate}/s: achieved {point.rps:.0f}/s, p99 {point.p99_ms:.2f} ms")
                if point.rps < 0.9 * rate or point.p99_ms > 250:
                    break  # saturated: the next points only measure queueing
            report.sweep[design] = points


async def lua_section(report: Report, rt: Runtime, orgs: list[tuple[str, str]], iterations: int = 5_000) -> None:
    """Microseconds per call at the client and inside Redis (INFO commandstats), the median of
    three rounds, beside the floor: an empty script called with the same keys and arguments."""
    org, call = orgs[0]
    keys = rt.keys.org(org)
    check_keys = [keys.org, keys.holds, keys.outbox]
    check_args: list[Any] = [0, org, call, 0, 600_000, 100_000, 8]
    empty_sha = await rt.redis.script_load("return {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}")
    counter = iter(range(10**9))
    rounds: dict[str, Callable[[], Awaitable[object]]] = {
        "empty script (floor)": lambda: asyncio_reply(rt.redis.evalsha(empty_sha, 3, *check_keys, *check_args)),
        "hold_check": lambda: rt.scripts.run(rt.redis, "hold_check", check_keys, check_args),
        "asset_deduct": lambda: deduct_asset(rt, orgs[next(counter) % len(orgs)][0], f"lua-{next(counter)}", 1),
        "hold_reserve": lambda: reserve_call(rt, orgs[next(counter) % len(orgs)][0], f"lua-call-{next(counter)}"),
    }
    for name, call_once in rounds.items():
        client_us, server_us = [], []
        for _ in range(3):
            await rt.redis.config_resetstat()
            started = time.perf_counter()
            for _ in range(iterations):
                await call_once()
            client_us.append((time.perf_counter() - started) / iterations * 1e6)
            stats = await rt.redis.info("commandstats")
            server_us.append(float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0)))
        report.lua[name] = {
            "client_round_trip_us": round(sorted(client_us)[1], 1),
            "redis_usec_per_call": round(sorted(server_us)[1], 2),
        }
        log(
            f"lua {name}: {report.lua[name]['client_round_trip_us']} us at the client, "
            f"{report.lua[name]['redis_usec_per_call']} us inside Redis"
        )


def endpoint_section(
    report: Report, env: dict[str, str], data_dir: Path, orgs: list[tuple[str, str]], d: Durations
) -> None:
    rate = 300
    with (
        WebServer("status-check", env, data_dir) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        keys = [client.post(f"/api/admin/orgs/{org}/api-keys", headers=admin).json()["api_key"] for org, _ in orgs[:50]]
        host = f"127.0.0.1:{server.port}"
        total = rate * d.endpoint_s
        reserve = [
            http_request("POST", f"/api/calls/ep-{i}/reserve", host, b"", {"Authorization": f"Bearer {keys[i % 50]}"})
            for i in range(total)
        ]
        commits = []
        for i in range(total):
            org = orgs[i % 50][0]
            body = json.dumps(
                {
                    "message": {
                        "type": "end-of-call-report",
                        "endedReason": "customer-ended-call",
                        "startedAt": "2026-11-24T12:00:00Z",
                        "endedAt": "2026-11-24T12:01:30Z",
                        "call": {
                            "id": f"ep-{i}",
                            "orgId": "v",
                            "createdAt": "x",
                            "updatedAt": "x",
                            "assistantOverrides": {"variableValues": {"org_id": org}},
                        },
                    }
                }
            ).encode()
            commits.append(
                http_request(
                    "POST",
                    "/api/vapi/webhook",
                    host,
                    body,
                    {"Content-Type": "application/json", "X-Vapi-Secret": WEBHOOK_SECRET},
                )
            )
        provisions = [
            http_request(
                "POST",
                "/api/managed-telephony/provision",
                host,
                b"{}",
                {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {keys[i % 50]}",
                    "Idempotency-Key": f"bench-{i}",
                },
            )
            for i in range(total)
        ]
        for name, requests in (
            ("reserve", reserve),
            ("commit (end-of-call-report)", commits),
            ("provision", provisions),
        ):
            result: RateResult = run_at_rate("127.0.0.1", server.port, requests.__getitem__, rate, d.endpoint_s)
            bad = {status: n for status, n in result.statuses.items() if status >= 300}
            report.endpoints[name] = {
                "rate": rate,
                "p50_ms": round(result.percentile_ms(0.5), 2),
                "p99_ms": round(result.percentile_ms(0.99), 2),
                "completed": result.completed,
                "non_2xx": sum(bad.values()) + result.errors,
            }
            log(
                f"{name}: p50 {result.percentile_ms(0.5):.2f} ms, p99 {result.percentile_ms(0.99):.2f} ms, non-2xx {bad}"
            )


async def _deduct_at_rate(
    rt: Runtime, orgs: list[tuple[str, str]], rate: int, seconds: int, tag: str
) -> tuple[int, int]:
    """(deductions made, deductions this client could not send): on a busy machine the open loop can
    outrun Redis, and a deduction its client gives up on (no connection free within the pool's 5 s)
    is counted and logged, not waited for."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = []
    for i in range(rate * seconds):
        due = started + i / rate
        delay = due - loop.time()
        if delay > 0.001:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(deduct_asset(rt, orgs[i % len(orgs)][0], f"{tag}-{i}", 1)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    unsent = [r for r in results if isinstance(r, RedisError)]
    if len(unsent) < sum(isinstance(r, BaseException) for r in results):
        raise next(r for r in results if isinstance(r, BaseException) and not isinstance(r, RedisError))
    if unsent:
        log(f"ledger: {len(unsent):,} deductions not sent; the first: {unsent[0]!r}")
    return len(tasks) - len(unsent), len(unsent)


async def ledger_section(
    report: Report, rt: Runtime, env: dict[str, str], data_dir: Path, orgs: list[tuple[str, str]], d: Durations
) -> None:
    targets = orgs[:1000]
    log(f"ledger: {d.ledger_entries:,} entries into the outboxes of {len(targets)} orgs")
    for start in range(0, d.ledger_entries, 1000):
        await asyncio.gather(
            *[
                deduct_asset(rt, targets[i % len(targets)][0], f"drain-{i}", 1)
                for i in range(start, min(start + 1000, d.ledger_entries))
            ]
        )
    outboxes = [rt.keys.org(org).outbox for org, _ in targets]

    async def waiting() -> int:
        # Watched in Redis: counting ledger rows in Postgres would take CPU from the writer.
        async with rt.redis.pipeline(transaction=False) as pipe:
            for outbox in outboxes:
                pipe.xlen(outbox)
            return sum(await pipe.execute())

    prefilled = await waiting()
    with open(data_dir / "worker.log", "ab") as log_file:
        worker = subprocess.Popen(processes.cli("worker"), env=env, stdout=log_file, stderr=log_file)
    try:
        first_seen = None
        while True:  # ends when the prefilled entries are all written (or after 10 minutes)
            left = await waiting()
            now = time.monotonic()
            if left < prefilled and first_seen is None:
                first_seen = (now, left)
            if left == 0 or now - (first_seen or (now, 0))[0] > 600:
                break
            await asyncio.sleep(0.05)
        assert first_seen is not None
        drain_rate = (first_seen[1] - left) / max(now - first_seen[0], 1e-6)
        worker_cpu = cpu_seconds([worker.pid])
        log(f"ledger: drained at {drain_rate:,.0f} entries/s")
        log(f"ledger: outbox lag under 2,000 deductions/s for {d.lag_run_s}s")
        lag_started = time.time()
        sent, unsent = await _deduct_at_rate(rt, targets, 2000, d.lag_run_s, "lag")
        while (
            await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE idempotency_key LIKE '%/asset/lag-%'")
            < sent
        ):
            await asyncio.sleep(0.1)
        lags = await rt.pg.fetchrow(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM recorded_at - created_at)) AS p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM recorded_at - created_at)) AS p99,
                      max(extract(epoch FROM recorded_at - created_at)) AS worst
               FROM ledger_entries WHERE idempotency_key LIKE '%/asset/lag-%'"""
        )
        report.ledger = {
            "drain_entries_per_s": round(drain_rate),
            "prefilled_entries": d.ledger_entries,
            "lag_rate_per_s": 2000,
            "lag_entries": sent,
            "lag_not_sent": unsent,
            "lag_p50_ms": round(float(lags["p50"]) * 1000, 1),
            "lag_p99_ms": round(float(lags["p99"]) * 1000, 1),
            "lag_max_ms": round(float(lags["worst"]) * 1000, 1),
            "lag_run_s": round(time.time() - lag_started, 1),
            "worker_cpu_s": round(worker_cpu, 1),
        }
        log(f"ledger: lag p50 {report.ledger['lag_p50_ms']} ms, p99 {report.ledger['lag_p99_ms']} ms")
    finally:
        worker.terminate()
        worker.wait(30)


async def reconcile_section(report: Report, pg_url: str, redis_url: str, d: Durations) -> None:
    name = f"bench_reconcile_{secrets.token_hex(3)}"
    admin = await asyncpg_connect(pg_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = with_database(pg_url, name)
    await asyncio.to_thread(upgrade_to_head, url)
    orgs, per_org = d.reconcile_orgs, d.reconcile_entries_per_org
    log(f"reconcile: generating {orgs:,} orgs and {orgs * per_org:,} ledger entries")
    conn = await asyncpg_connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")  # bulk load: the chain is built right below
        await conn.execute(
            "INSERT INTO orgs (org_id, name, rate_pence_per_minute) SELECT 'r' || i, 'r', 60 FROM generate_series(1, $1) i",
            orgs,
        )
        await conn.execute(
            """INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, balance_after_pence,
                   debt_after_pence, source, created_at, meta)
               SELECT 'r' || o, 'r' || o || CASE WHEN k = 0 THEN '/topup/t' ELSE '/asset/a' || k END,
                      CASE WHEN k = 0 THEN 'topup' ELSE 'asset' END,
                      CASE WHEN k = 0 THEN 100000 ELSE -10 END, 100000 - 10 * k, 0,
                      CASE WHEN k = 0 THEN 'postgres' ELSE 'redis' END,
                      now() - make_interval(secs => (random() * 500000)::int),
                      CASE WHEN k = 0 THEN '{}'::jsonb ELSE jsonb_build_object('redis', jsonb_build_object('balance_after_pence', 100000 - 10 * k)) END
               FROM generate_series(1, $1) o, generate_series(0, $2 - 1) k""",
            orgs,
            per_org,
        )
        await conn.execute(
            """INSERT INTO org_balances (org_id, balance_pence, entry_count, last_entry_id)
               SELECT org_id, min(balance_after_pence), count(*), max(id) FROM ledger_entries GROUP BY org_id"""
        )
        await conn.execute(
            """INSERT INTO call_holds (org_id, call_id, status, hold_pence, rate_pence_per_minute, created_at,
                   last_seen_at, expires_at, max_duration_seconds, version)
               SELECT 'r' || o, 'live-' || o, 'live', 300, 60, now(), now(), now() + interval '1 hour', 3600, 1
               FROM generate_series(1, $1, 10) o""",
            orgs,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    settings = replace(
        Settings(), redis_url=redis_url, database_url=url, key_prefix=f"rc{secrets.token_hex(3)}", pg_pool_size=4
    )
    rt = await Runtime.open(settings)
    try:
        log("reconcile: rebuilding Redis from Postgres")
        started = time.monotonic()
        rebuilt = await rebuild_all(rt)
        seconds = time.monotonic() - started
        idem = await asyncio_reply(rt.redis.hlen(rt.keys.org("r1").idem))
    finally:
        await rt.close()
    report.reconcile = {
        "orgs": orgs,
        "ledger_entries": orgs * per_org,
        "live_holds": (orgs + 9) // 10,
        "orgs_restored": rebuilt.orgs_restored,
        "seconds": round(seconds, 1),
        "idempotency_records_per_org": idem,
    }
    log(f"reconcile: {orgs:,} orgs in {seconds:.1f}s")


async def asyncpg_connect(url: str) -> Any:
    import asyncpg

    from credit_engine.engine.db import asyncpg_dsn

    return await asyncpg.connect(asyncpg_dsn(url))


# Main -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": platform.processor() or _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


async def run(durations: Durations, out: Path, sections: set[str]) -> Report:
    report = Report(machine=machine())
    data_dir = new_scratch_dir("credit-engine-bench-")
    redis = EmbeddedRedis(data_dir / "redis", appendfsync="everysec")
    postgres = EmbeddedPostgres(data_dir / "postgres", user=Settings.from_env().pg_user)
    redis.start()
    postgres.start()
    try:
        await asyncio.to_thread(upgrade_to_head, postgres.url)
        # The bench's own client is a load generator too (2,000 deductions/s, open loop, for the lag):
        # on a busy machine 64 connections can all wait on Redis past the pool's 5 s (see
        # _deduct_at_rate); the figures measured are the worker's and the web servers', not this pool's.
        settings = replace(
            Settings(), redis_url=redis.url, database_url=postgres.url, pg_pool_size=20, redis_pool_size=1024
        )
        env = {
            **os.environ,
            "REDIS_URL": redis.url,
            "DATABASE_URL": postgres.url,
            "VAPI_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "CREDIT_ENGINE_ADMIN_TOKEN": ADMIN_TOKEN,
            "CREDIT_ENGINE_LOG_LEVEL": "WARNING",
            "CREDIT_ENGINE_PG_POOL_SIZE": "20",
            "CREDIT_ENGINE_PHONE_NUMBER_PENCE": "100",
        }
        rt = await Runtime.open(settings)
        try:
            log(f"seeding {ORGS_MANY:,} orgs with a live call each")
            orgs = await seed_many_orgs(rt, ORGS_MANY)
            await seed_the_seed_design(postgres.url, orgs)
            assert redis.process is not None and postgres.process is not None
            store_pids = {"redis": [redis.process.pid], "postgres": [postgres.process.pid]}
            if "ratio" in sections:
                await asyncio.to_thread(side_by_side_section, report, env, data_dir, orgs, durations)
            if "status" in sections:
                await asyncio.to_thread(status_check_section, report, env, data_dir, orgs, store_pids, durations)
            if "lua" in sections:
                await lua_section(report, rt, orgs)
            if "endpoints" in sections:
                await asyncio.to_thread(endpoint_section, report, env, data_dir, orgs, durations)
            if "ledger" in sections:
                await ledger_section(report, rt, env, data_dir, orgs, durations)
        finally:
            await rt.close()
        if "reconcile" in sections:
            await reconcile_section(report, postgres.url, redis.url, durations)
    finally:
        postgres.stop()
        redis.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="credit-engine bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs and small data (a smoke test, not figures)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where benchmarks.md, the plot and the JSON go")
    parser.add_argument(
        "--only",
        default="ratio,status,lua,endpoints,ledger,reconcile",
        help="comma-separated sections (ratio: the status check and the bare endpoint side by side, CPU per request)",
    )
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    if sections & {"ratio", "status", "endpoints"} and shutil.which("wrk") is None:
        print(
            "credit-engine bench: the ratio, status and endpoints sections drive load with wrk, which is not installed "
            "(Debian/Ubuntu: apt-get install wrk); or run --only lua,ledger,reconcile",
            file=sys.stderr,
        )
        return 2
    durations = Durations.quick() if args.quick else Durations()
    random.seed(2026)
    report = asyncio.run(run(durations, args.out, sections))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(asdict(report), indent=2))
    from credit_engine.loadtest.bench_report import write_report

    write_report(report, args.out, " ".join(["credit-engine bench", *(argv if argv is not None else sys.argv[1:])]))
    print((args.out / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
