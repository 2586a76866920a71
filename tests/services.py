"""Real Redis and Postgres for the tests: embedded by default, the machine's when told.

CREDIT_ENGINE_TEST_REDIS_URL     use this Redis instead of starting one (keys get a per-test prefix)
CREDIT_ENGINE_TEST_DATABASE_URL  use this Postgres (an admin URL; each test gets its own database)
CREDIT_ENGINE_TEST_REDIS_CLUSTER=1  start a 3-master Redis Cluster on loopback ports and run the
                                 engine against it; arq gets the plain Redis above (its own Redis
                                 in production too: engine/config.py's arq_url)

Tests never touch data they did not create: their own key prefix, their own databases, dropped
when they finish.

An embedded Postgres keeps its data in a folder of its own in /tmp (`postgres_data_dir`), never
under pytest's basetemp: run as root, Postgres runs as its own user, who cannot enter pytest's
0700 folders (and the engine opens no folder it was not given), and the next pytest session on the
machine would re-chmod them 0700 under a running server anyway.
"""

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from credit_engine.engine.config import Settings
from credit_engine.engine.db import asyncpg_dsn, with_database
from credit_engine.engine.embedded import EmbeddedPostgres, EmbeddedRedis, scratch_dir
from credit_engine.engine.migrate import upgrade_to_head
from credit_engine.loadtest.redis_cluster import EmbeddedRedisCluster


@dataclass
class Services:
    redis_url: str
    pg_admin_url: str
    embedded_redis: EmbeddedRedis | None
    embedded_pg: EmbeddedPostgres | None
    cluster: EmbeddedRedisCluster | None = None
    arq_redis_url: str | None = None  # set when redis_url is a cluster

    @property
    def redis_cluster(self) -> bool:
        return self.cluster is not None

    @property
    def kind(self) -> str:
        return "embedded" if self.embedded_redis is not None else "system"


PG_DATA_PREFIX = "credit-engine-pg-"
PG_DATA_PARENT = Path("/tmp")


@contextmanager
def postgres_data_dir() -> Iterator[Path]:
    """A new folder for a test's embedded Postgres (or a whole `up`), outside pytest's basetemp and
    reachable by Postgres' user; removed, with everything in it, when the test is done."""
    with scratch_dir(PG_DATA_PREFIX, PG_DATA_PARENT) as folder:
        yield folder


def embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """An EmbeddedPostgres run, as root, by CREDIT_ENGINE_PG_USER's user (as `up`'s would be)."""
    return EmbeddedPostgres(data_dir, user=Settings.from_env().pg_user)


def start_services(data_dir: Path, pg_dir: Path) -> Services:
    """Redis (and a cluster) under `data_dir`; Postgres under `pg_dir`, from `postgres_data_dir`."""
    redis_url = os.environ.get("CREDIT_ENGINE_TEST_REDIS_URL")
    pg_url = os.environ.get("CREDIT_ENGINE_TEST_DATABASE_URL")
    embedded_redis = embedded_pg = None
    if not redis_url:
        embedded_redis = EmbeddedRedis(data_dir / "redis", appendfsync=None)
        redis_url = embedded_redis.start()
    if not pg_url:
        embedded_pg = embedded_postgres(pg_dir / "postgres")
        pg_url = embedded_pg.start()
    if os.environ.get("CREDIT_ENGINE_TEST_REDIS_CLUSTER", "") not in ("", "0"):
        cluster = EmbeddedRedisCluster(data_dir / "redis-cluster", masters=3)
        return Services(cluster.start(), pg_url, embedded_redis, embedded_pg, cluster, arq_redis_url=redis_url)
    return Services(redis_url, pg_url, embedded_redis, embedded_pg)


def stop_services(services: Services) -> None:
    if services.cluster is not None:
        services.cluster.stop()
    if services.embedded_pg is not None:
        services.embedded_pg.stop()
    if services.embedded_redis is not None:
        services.embedded_redis.stop()


async def _admin(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_template_database(admin_url: str) -> str:
    name = f"ce_test_tpl_{secrets.token_hex(4)}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    upgrade_to_head(with_database(admin_url, name))
    return name


async def create_test_database(admin_url: str, template: str) -> str:
    name = f"ce_test_{secrets.token_hex(6)}"
    await _admin(admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


async def drop_database(admin_url: str, name: str) -> None:
    assert name.startswith("ce_test_")
    await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
