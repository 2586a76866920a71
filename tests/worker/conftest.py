from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from credit_engine.engine.config import Settings


@pytest.fixture(autouse=True)
async def delete_arq_keys(settings: Settings) -> AsyncIterator[None]:
    """arq keeps job and result keys under its own fixed prefix; ours carry our prefix in them."""
    yield
    redis = Redis.from_url(settings.arq_url)
    try:
        async for key in redis.scan_iter(match=f"arq:*{settings.key_prefix}*", count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()
