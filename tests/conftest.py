import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.db import with_database
from credit_engine.engine.runtime import Runtime
from tests.fake_vapi_api import FakeVapiApi, fake_vapi_api_server
from tests.services import (
    Services,
    create_template_database,
    create_test_database,
    drop_database,
    postgres_data_dir,
    start_services,
    stop_services,
)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with postgres_data_dir() as pg_dir:
        started = start_services(tmp_path_factory.mktemp("services"), pg_dir)
        yield started
        stop_services(started)


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    """A test's own folder for an embedded Postgres, outside pytest's basetemp (tests/services.py)."""
    with postgres_data_dir() as folder:
        yield folder


@pytest.fixture(scope="session")
def template_database(services: Services) -> Iterator[str]:
    name = create_template_database(services.pg_admin_url)
    yield name
    asyncio.run(drop_database(services.pg_admin_url, name))


@pytest.fixture
async def database_url(services: Services, template_database: str) -> AsyncIterator[str]:
    name = await create_test_database(services.pg_admin_url, template_database)
    yield with_database(services.pg_admin_url, name)
    await drop_database(services.pg_admin_url, name)


@pytest.fixture
def key_prefix() -> str:
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
def settings(services: Services, database_url: str, key_prefix: str) -> Settings:
    return replace(
        Settings(),
        redis_url=services.redis_url,
        redis_cluster=services.redis_cluster,
        arq_redis_url=services.arq_redis_url,
        database_url=database_url,
        key_prefix=key_prefix,
    )


async def connect_any(redis_url: str) -> Redis:
    """A client for a plain Redis or, if the server says it is one, for its Redis Cluster."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    if (await redis.info("cluster")).get("cluster_enabled") == 1:
        await redis.aclose()
        return RedisCluster.from_url(redis_url, decode_responses=True)  # type: ignore[return-value]
    return redis


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Every key of the prefix, on every node of a cluster (its scan visits each master)."""
    redis = await connect_any(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):  # a cluster's rebuild leaves 16,384 slot markers
            async with redis.pipeline(transaction=False) as pipe:
                for key in keys[start : start + 1000]:
                    pipe.delete(key)
                await pipe.execute()
    finally:
        await redis.aclose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def rt(settings: Settings, clock: ManualClock) -> AsyncIterator[Runtime]:
    runtime = await Runtime.open(settings, clock=clock)
    yield runtime
    await runtime.close()
    assert settings.redis_url is not None
    await delete_prefix(settings.redis_url, settings.key_prefix)


@pytest.fixture
async def vapi_api() -> AsyncIterator[FakeVapiApi]:
    """A fake of Vapi's REST API that checks what it is sent against Vapi's SDK (tests/fake_vapi_api.py)."""
    async with fake_vapi_api_server() as fake:
        yield fake
