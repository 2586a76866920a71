"""Run the worker process: `credit-engine worker`."""

import asyncio
import logging

import uvloop

from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.config import Settings

log = logging.getLogger(__name__)

redis_retry_pause_s = 1.0


class CreditEngineWorker(Worker):
    async def _poll_iteration(self) -> None:
        """arq lets a Redis error out of its poll loop, which ends the worker: a Redis restart would
        leave no worker at all. Wait for Redis instead; the drain and timed loops do the same."""
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as error:
            log.warning("redis unreachable (%s); polling again in %.0f s", error, redis_retry_pause_s)
            await asyncio.sleep(redis_retry_pause_s)

    async def close(self) -> None:
        """On SIGTERM arq cancels its running jobs, then gathers them without return_exceptions. A job
        cancelled while arq books it in Redis (outside the job's own wait_for) then raises
        CancelledError out of close(): on_shutdown never runs and the process exits 1. Our jobs are
        idempotent and run again anyway, so wait for them to settle and let arq close as usual."""
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
        await super().close()


def run_worker(settings: Settings) -> None:
    from worker.settings import worker_options

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = CreditEngineWorker(**worker_options(settings))
    worker.run()
