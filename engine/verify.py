"""`credit-engine verify`: the seed's deployment verification, run against the real thing.

Connects to the configured Redis and Postgres and checks, each on its own so one failure does
not hide the others: both answer; the schema is at this release's migration head with every
table, column, constraint and index it expects; every shipped Lua script loads and Redis computes
the SHA1 we ship; Redis holds the rebuilt state; a worker is alive; the ledger is not further
behind than the readiness limit; and Redis agrees with Postgres for a sample of orgs.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from credit_engine.engine import schema
from credit_engine.engine.call_server import engine_server
from credit_engine.engine.clock import redis_now_ms
from credit_engine.engine.cluster import is_cluster
from credit_engine.engine.config import Settings
from credit_engine.engine.db import asyncpg_dsn
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.ledger_lag import outbox_lag_ms
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.restore import markers_present
from credit_engine.engine.runtime import Runtime, redis_client
from credit_engine.engine.scripts import load_scripts
from credit_engine.engine.worker_health import arq_health_check_present, worker_stats

connect_timeout_s = 5.0
heartbeat_stale_ms = 10_000
sample_size_default = 50


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # passed, but something an operator must know (shown as "!")


@dataclass
class Verification:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(check) for check in self.checks]}

    def table(self) -> str:
        width = max(len(check.name) for check in self.checks)
        marks = {(True, False): "✓", (True, True): "!", (False, False): "✗", (False, True): "✗"}
        lines = [f"{marks[check.ok, check.warning]} {check.name.ljust(width)}  {check.detail}" for check in self.checks]
        passed = sum(check.ok for check in self.checks)
        warnings = sum(check.ok and check.warning for check in self.checks)
        lines.append(
            f"{passed}/{len(self.checks)} checks passed" + (f" ({warnings} with a warning)" if warnings else "")
        )
        return "\n".join(lines)


async def _guarded(name: str, probe: Callable[[], Awaitable[tuple[bool, str]]]) -> Check:
    try:
        ok, detail = await asyncio.wait_for(probe(), timeout=60)
    except Exception as error:  # a check that cannot run is a failed check, with the reason
        return Check(name, False, f"{type(error).__name__}: {error}")
    return Check(name, ok, detail)


async def verify(settings: Settings, sample_size: int = sample_size_default) -> Verification:
    """Every check in turn, each guarded (a check that cannot run fails with the reason), then the
    Vapi routing check, which needs no connection."""
    assert settings.redis_url is not None and settings.database_url is not None
    redis = redis_client(settings.redis_url, 4, connect_timeout_s, cluster=settings.redis_cluster)
    probes = _Probes(settings, sample_size, redis, Keyspace(settings.key_prefix))
    try:
        checks = [await _guarded(name, probe) for name, probe in probes.in_order()]
        checks.append(vapi_routing_check(settings))
        checks.append(vapi_records_check(settings))
    finally:
        if probes.pg is not None:
            await probes.pg.close()
        await redis.aclose()
    return Verification(checks)


Probe = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class _Probes:
    """verify's checks, run in order, and what they share: the Redis client; the Postgres
    connection the second check opens (the schema and sample checks use it); the worker's stats
    and Redis's clock that the worker check reads and the lag check uses."""

    settings: Settings
    sample_size: int
    redis: Redis
    keys: Keyspace
    pg: asyncpg.Connection | None = None
    stats: dict[str, int] = field(default_factory=dict)
    now_ms: int = 0

    def in_order(self) -> list[tuple[str, Probe]]:
        return [
            ("redis reachable", self.redis_answers),
            ("postgres reachable", lambda: _prefixed("Postgres ", self.postgres_answers())),
            ("schema at head", self.schema_at_head),
            ("lua scripts", self.scripts_load),
            ("redis state", self.state_present),
            ("worker alive", self.worker_alive),
            ("outbox lag", self.ledger_lag),
            ("redis = postgres", self.sample_agrees),
        ]

    async def redis_answers(self) -> tuple[bool, str]:
        info = await self.redis.info("server")
        try:
            appendfsync = (await self.redis.config_get("appendfsync")).get("appendfsync", "?")
        except ResponseError:  # managed Redis often forbids CONFIG
            appendfsync = "unknown (CONFIG not allowed)"
        shape = f", a cluster of {len(self.redis.get_primaries())} masters" if is_cluster(self.redis) else ""
        return True, f"Redis {info.get('redis_version')}{shape}, appendfsync {appendfsync}"

    async def postgres_answers(self) -> tuple[bool, str]:
        self.pg = await asyncpg.connect(asyncpg_dsn(self.settings.database_url or ""), timeout=connect_timeout_s)
        return True, str(await self.pg.fetchval("SHOW server_version")).split()[0]

    async def schema_at_head(self) -> tuple[bool, str]:
        assert self.pg is not None, "no connection"
        want = schema.expected()
        problems = schema.differences(want, await schema.describe(self.pg))
        if problems:
            return False, "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        return True, f"migration {want['revision']}, {len(want['tables'])} tables as expected"

    async def scripts_load(self) -> tuple[bool, str]:
        scripts = load_scripts()
        wrong = [name for name, script in scripts.items() if await self.redis.script_load(script.source) != script.sha]
        if wrong:
            return False, f"Redis computed another SHA for {', '.join(wrong)}"
        return True, f"{len(scripts)} scripts loaded, SHA1 as shipped"

    async def state_present(self) -> tuple[bool, str]:
        state = await asyncio_reply(self.redis.hgetall(self.keys.state))
        if not state or not await markers_present(self.redis, self.keys):
            return (
                False,
                "no state marker: Redis has not been rebuilt from Postgres (start the web app or the worker)",
            )
        return True, f"rebuilt for {state.get('orgs', '?')} orgs"

    async def worker_alive(self) -> tuple[bool, str]:
        self.stats = await worker_stats(self.redis, self.keys)
        self.now_ms = await redis_now_ms(self.redis)
        arq_alive = await arq_health_check_present(self.settings, self.redis)
        if "heartbeat_ms" not in self.stats:
            return False, "no worker has ever reported"
        silence_ms = self.now_ms - self.stats["heartbeat_ms"]
        ok = silence_ms <= heartbeat_stale_ms and bool(arq_alive)
        arq = {True: "present", False: "missing", None: "unknown (CREDIT_ENGINE_ARQ_REDIS_URL not set)"}[arq_alive]
        return ok, f"last heartbeat {silence_ms / 1000:.1f} s ago, arq health check {arq}"

    async def ledger_lag(self) -> tuple[bool, str]:
        lag_ms = outbox_lag_ms(self.stats, self.now_ms) if self.stats else None
        if lag_ms is None:
            return False, "unknown: no worker has reported"
        limit_ms = self.settings.readiness_outbox_lag_s_max * 1000
        return (
            lag_ms <= limit_ms,
            f"{lag_ms} ms behind (limit {limit_ms} ms), {self.stats.get('outbox_entries', 0)} entries waiting",
        )

    async def sample_agrees(self) -> tuple[bool, str]:
        assert self.pg is not None, "no connection"
        from credit_engine.engine.reconciler import check

        org_ids = [row["org_id"] for row in await self.pg.fetch("SELECT org_id FROM orgs")]
        sample = random.sample(org_ids, min(self.sample_size, len(org_ids)))
        if not sample:
            return True, "no orgs yet"
        rt = await Runtime.open(self.settings)
        try:
            report = await check(rt, sample)
        finally:
            await rt.close()
        if report.drifted:
            return (
                False,
                f"{len(report.drifted)} of {len(sample)} sampled orgs drifted: {', '.join(d.org_id for d in report.drifted[:5])}",
            )
        if report.busy:
            return (
                False,
                f"{len(report.busy)} of {len(sample)} sampled orgs changed on every read: {', '.join(report.busy[:5])}",
            )
        return True, f"{len(sample)} of {len(org_ids)} orgs sampled, Redis = Postgres"


def vapi_routing_check(settings: Settings) -> Check:
    """Whether admitted calls name this engine as their server (engine/call_server.py)."""
    server = engine_server(settings)
    if server is None:
        return Check(
            "vapi routing",
            True,
            "CREDIT_ENGINE_PUBLIC_URL is not set: admitted calls do not name this engine as "
            "their server, so an assistant with its own server URL takes their messages (and billing) away",
            warning=True,
        )
    auth = "credential " + server["credentialId"] if "credentialId" in server else "X-Vapi-Secret header"
    return Check("vapi routing", True, f"admitted calls' server is {server['url']} ({auth})")


def vapi_records_check(settings: Settings) -> Check:
    """Whether the worker can ask Vapi about silent holds and audit the ledger (engine/settle.py,
    engine/audit.py): both need VAPI_API_KEY."""
    if settings.vapi_api_key is None:
        return Check(
            "vapi records",
            True,
            "VAPI_API_KEY is not set: a hold whose report never came expires at the time the engine saw "
            "(not settled from Vapi's record), and no daily audit against Vapi's calls runs",
            warning=True,
        )
    return Check(
        "vapi records",
        True,
        f"silent holds settled from Vapi's records and a daily audit, at most {settings.vapi_api_rps} lookups/s",
    )


async def _prefixed(prefix: str, probe: Awaitable[tuple[bool, str]]) -> tuple[bool, str]:
    ok, detail = await probe
    return ok, prefix + detail
