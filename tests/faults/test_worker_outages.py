"""The worker process lives through a Redis outage (arq alone would end it), and stops cleanly
even while Redis is away."""

import time
from dataclasses import replace
from pathlib import Path

import pytest

from credit_engine.engine.config import Settings
from credit_engine.engine.embedded import EmbeddedRedis
from credit_engine.engine.runtime import Runtime
from tests.processes import start_worker, stop, wait_for
from tests.worker.test_worker_process import worker_ready

pytestmark = pytest.mark.faults


async def test_the_worker_outlives_a_redis_outage_and_stops_cleanly_during_one(
    settings: Settings, tmp_path: Path
) -> None:
    redis = EmbeddedRedis(tmp_path / "redis", appendfsync="always")
    redis.start()
    own = replace(
        settings, redis_url=redis.url, redis_cluster=False, arq_redis_url=None
    )  # its own plain Redis, to kill
    rt = await Runtime.open(own)
    worker = start_worker(own, tmp_path / "worker.log")
    try:
        await wait_for(lambda: worker_ready(rt), 30, "the worker to start")
        for _ in range(2):  # an outage, then back, then another
            redis.kill()
            time.sleep(3)  # several poll rounds, cron runs and drain loops meet a dead Redis
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            redis.start()
            await rt.redis.delete(rt.keys.arq_queue + ":health-check")
            await wait_for(lambda: worker_ready(rt), 30, "the worker to report again")
        redis.kill()
        time.sleep(1)
        assert stop(worker) == 0  # SIGTERM while Redis is away
    finally:
        stop(worker)
        await rt.close()
        redis.kill()
