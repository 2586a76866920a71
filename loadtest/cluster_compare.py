"""The engine's Redis decisions on a 3-master Redis Cluster beside a single Redis, in the same run.

    python -m credit_engine.loadtest.cluster_compare [--orgs 1000] [--ops 20000] [--concurrency 64] [--out docs]

Both servers are embedded (loopback, no persistence) and driven by the engine's own functions
through the engine's own clients: a hold check on a live call (one EVALSHA), an asset deduction
(the script and its doorbell ring) and the worker's doorbell pop. Sequential latency (p50/p99)
and throughput at a fixed concurrency, cluster ÷ single. On one machine the cluster cannot be
faster (its three servers share the cores); the figure is its cost, not its capacity.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.clock import RedisClock
from credit_engine.engine.config import Settings
from credit_engine.engine.doorbell import pop_rung
from credit_engine.engine.embedded import EmbeddedRedis
from credit_engine.engine.holds import CallEvent, check_call, reserve_call
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.restore import restore_orgs
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime, redis_client
from credit_engine.engine.scripts import ScriptRunner
from credit_engine.engine.snapshots import OrgSnapshot
from credit_engine.loadtest.redis_cluster import EmbeddedRedisCluster


async def open_rt(url: str, cluster: bool, pool_size: int) -> Runtime:
    redis = redis_client(url, pool_size, cluster=cluster)
    scripts = ScriptRunner()
    await scripts.load(redis)
    settings = replace(Settings(), redis_url=url, redis_cluster=cluster, key_prefix="bench")
    return Runtime(settings=settings, redis=redis, pg=None, keys=Keyspace("bench"), scripts=scripts, clock=RedisClock())


async def seed(rt: Runtime, orgs: int) -> list[str]:
    org_ids = [f"org-{n}" for n in range(orgs)]
    snapshots = [
        OrgSnapshot(
            org_id=org_id,
            name=org_id,
            settings=OrgSettings(rate_pence_per_minute=60),
            balance_pence=10**9,
            debt_pence=0,
            last_entry_id=None,
            live_holds={},
            idem=[],
            pending_credit_keys=frozenset(),
        )
        for org_id in org_ids
    ]
    for start in range(0, len(snapshots), 200):
        outcomes = await restore_orgs(rt, snapshots[start : start + 200], "absent")
        assert set(outcomes.values()) == {Outcome.ok}
    for org_id in org_ids:
        assert (await reserve_call(rt, org_id, "live")).outcome == Outcome.ok
        await check_call(rt, org_id, "live", CallEvent.start)
    return org_ids


async def latencies_us(op: Callable[[int], Awaitable[Any]], count: int) -> list[float]:
    out = []
    for i in range(count):
        started = time.perf_counter()
        await op(i)
        out.append((time.perf_counter() - started) * 1e6)
    return out


async def throughput(op: Callable[[int], Awaitable[Any]], count: int, concurrency: int) -> float:
    next_i = 0

    async def client() -> None:
        nonlocal next_i
        while next_i < count:
            i = next_i
            next_i += 1
            await op(i)

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return count / (time.perf_counter() - started)


async def measure(rt: Runtime, orgs: int, ops: int, concurrency: int, run: int) -> dict[str, Any]:
    org_ids = await seed(rt, orgs)

    async def status_check(i: int) -> None:
        result = await check_call(rt, org_ids[i % len(org_ids)], "live", CallEvent.check)
        assert result.outcome == Outcome.ok

    async def deduct(i: int) -> None:
        result = await deduct_asset(rt, org_ids[i % len(org_ids)], f"r{run}-{i}", 1)
        assert result.outcome == Outcome.ok

    figures: dict[str, Any] = {}
    for name, op in (("status check", status_check), ("asset deduction", deduct)):
        lat = sorted(await latencies_us(op, min(ops, 5_000)))
        figures[name] = {
            "p50_us": round(statistics.median(lat), 1),
            "p99_us": round(lat[int(len(lat) * 0.99)], 1),
            "ops_per_s": round(await throughput(lambda i, op=op: op(i + 10**6), ops, concurrency)),  # type: ignore[misc]
        }
    pops = await latencies_us(lambda _: pop_rung(rt, 128), 2_000)
    figures["doorbell pop (16 shards)"] = {
        "p50_us": round(statistics.median(pops), 1),
        "p99_us": round(sorted(pops)[int(len(pops) * 0.99)], 1),
    }
    return figures


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        single = EmbeddedRedis(Path(tmp) / "single", appendfsync=None)
        cluster = EmbeddedRedisCluster(Path(tmp) / "cluster", masters=3, appendfsync=None)
        single.start()
        cluster.start()
        try:
            results = {}
            for run, (label, url, clustered) in enumerate(
                (("single", single.url, False), ("cluster", cluster.url, True))
            ):
                rt = await open_rt(url, clustered, args.concurrency)
                try:
                    results[label] = await measure(rt, args.orgs, args.ops, args.concurrency, run)
                finally:
                    await rt.redis.aclose()
        finally:
            cluster.stop()
            single.stop()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# A Redis Cluster beside a single Redis",
        "",
        f"`python -m credit_engine.loadtest.cluster_compare --orgs {args.orgs} --ops {args.ops} --concurrency {args.concurrency}`: "
        "both embedded on this machine, same run, the engine's own functions and clients.",
        "",
        "| operation | single p50 / p99 | cluster p50 / p99 | single ops/s | cluster ops/s | cluster ÷ single (ops/s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, single in results["single"].items():
        cluster = results["cluster"][name]
        rate = (
            f"{single['ops_per_s']:,} | {cluster['ops_per_s']:,} | {cluster['ops_per_s'] / single['ops_per_s']:.2f}"
            if "ops_per_s" in single
            else "— | — | —"
        )
        lines.append(
            f"| {name} | {single['p50_us']:.0f} / {single['p99_us']:.0f} µs | "
            f"{cluster['p50_us']:.0f} / {cluster['p99_us']:.0f} µs | {rate} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orgs", type=int, default=1_000)
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write cluster-compare.md and .json here")
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    text = report(figures, arguments)
    print(text)
    if arguments.out is not None:
        (arguments.out / "cluster-compare.md").write_text(text)
        (arguments.out / "cluster-compare.json").write_text(json.dumps(figures, indent=2) + "\n")
