"""The web app's state watch ends when the app stops, even while the store it watches is away
(a watch that outlives its shutdown keeps the process alive for good)."""

import asyncio
from dataclasses import replace

import pytest

from credit_engine.engine.clock import RedisClock
from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import free_port
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.runtime import Runtime, redis_client
from credit_engine.engine.scripts import ScriptRunner
from credit_engine.webapp import state
from credit_engine.webapp.state import StateGuard


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_the_watch_ends_promptly_while_redis_is_unreachable(
    cluster: bool, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "state_poll_interval_s", 0.05)
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    redis = redis_client(nowhere, 4, None, cluster=cluster)
    rt = Runtime(replace(Settings(), redis_cluster=cluster), redis, None, Keyspace("t"), ScriptRunner(), RedisClock())  # type: ignore[arg-type]
    guard = StateGuard(rt)
    guard.ready = True
    watch = asyncio.create_task(guard.watch_forever())
    await asyncio.sleep(0.5)  # several failed rounds
    assert not guard.ready and not watch.done()
    if how == "stop":
        guard.stop()
        await asyncio.wait_for(watch, 2)
    else:
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(watch, 2)
    await redis.aclose()
