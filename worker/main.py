"""Run the worker process: `credit-engine worker`."""

import asyncio
import logging
import signal

import uvloop

from arq.worker import Worker
from redis.exceptions import RedisError

from engine.config import Settings

log = logging.getLogger(__name__)

redis_retry_pause_s = 1.0


class CreditEngineWorker(Worker):
    async def _poll_iteration(self) -> None:
        """arq lets a Redis error out of its poll loop, which ends the worker: a Redis restart would
        leave no worker at all. Wait for Redis instead; the drain and timed loops do the same."""
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as error:  # a WatchError can wrap a lost connection too
            log.warning("redis unreachable (%s: %s); polling again in %.0f s", type(error).__name__, error,
                        redis_retry_pause_s)  # fmt: skip
            await asyncio.sleep(redis_retry_pause_s)

    async def close(self) -> None:
        """arq's close(), made safe for two ways it ends a worker with exit 1 and without on_shutdown:
        - on SIGTERM arq cancels its running jobs, then gathers them without return_exceptions, so a
          job cancelled while arq books it in Redis (outside the job's own wait_for) raises
          CancelledError here. Our jobs are idempotent and run again anyway: let them settle.
        - it deletes its health-check key before on_shutdown, which raises when Redis is down."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        try:
            await self.pool.delete(self.health_check_key)
        except (RedisError, OSError) as error:
            log.warning("could not delete the health-check key at shutdown (%s); it expires by itself", error)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None


def run_worker(settings: Settings) -> None:
    from worker.settings import worker_options

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = CreditEngineWorker(**worker_options(settings))
    worker.run()
