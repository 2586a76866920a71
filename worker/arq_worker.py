"""The one place the engine reaches into arq's private parts: a Worker subclass that overrides
arq 0.28.0's `start_jobs`, `_poll_iteration` and `close`, copying some of their steps and calling
`run_job`, `handle_sig` and `_release_sem_dec_counter_on_complete`, and that wraps on_startup in a
check relying on `main` (it runs on_startup before its poll loop) and `handle_sig` (it calls
on_stop). arq is pinned to that exact release in pyproject.toml, and `ARQ_SOURCES` holds a
fingerprint of each of those seven methods as read when this was written:
tests/worker/test_arq_worker.py fails the day arq changes one, so that whoever upgrades arq
re-reads it against this copy before the pin moves."""

import asyncio
import hashlib
import inspect
import logging
import signal
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import RedisError, ResponseError, WatchError

log = logging.getLogger(__name__)

ARQ_VERSION = "0.28.0"
# sha256 (first 16 hex digits) of inspect.getsource() of each arq.worker.Worker method relied on.
ARQ_SOURCES = {
    "start_jobs": "b45797cfa40bed7f",
    "_poll_iteration": "f8d39d823a0a59f2",
    "close": "5bcc9cb356680829",
    "run_job": "589a19059ff84ee7",
    "_release_sem_dec_counter_on_complete": "0ed101482e942c33",
    "handle_sig": "985ff7ba01aa8f04",
    "main": "45ca1591c9717466",
}
redis_retry_pause_s = 1.0


def arq_source_fingerprint(name: str) -> str:
    return hashlib.sha256(inspect.getsource(getattr(Worker, name)).encode()).hexdigest()[:16]


class CreditEngineWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_signal: signal.Signals | None = None
        self.on_stop = self._note_stop  # arq calls it from its SIGTERM/SIGINT handler, after cancelling main()
        if self.on_startup is not None:
            self._on_startup_given = self.on_startup
            self.on_startup = self._start_up

    def _note_stop(self, signum: signal.Signals) -> None:
        self.stop_signal = signum

    async def _start_up(self, ctx: dict[Any, Any]) -> None:
        """The given on_startup, then stop if a stop was asked for meanwhile. arq stops by cancelling
        main(), which is running on_startup then, and on Python 3.11 that cancellation can be lost:
        asyncio.wait_for returns its inner task's result instead of raising CancelledError when
        that task finished just before the cancellation reached the waiter (CPython gh-86296, fixed
        in 3.12), and redis-py 5 sends every command through asyncio.wait_for when the client has a
        socket timeout, as the runtime's has. The start-up then ran on and the worker with it,
        until killed; now it stops as soon as its start-up is done."""
        await self._on_startup_given(ctx)
        if self.stop_signal is not None:
            log.info("%s came during start-up: stopping now that start-up is done", self.stop_signal.name)
            raise asyncio.CancelledError

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, except that a job slot taken for a job whose claim then failed in Redis
        (a lost connection mid-WATCH) is given back. arq gives it back only for the errors it
        expects; once the poll loop survives Redis outages (below), every other error would leak a
        slot for good, and a worker that leaked max_jobs of them would never run a cron again."""
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return None
            self.job_counter = self.job_counter + 1
            started = False
            try:
                started = await self._claim_and_start(job_id_b.decode())
            finally:
                if not started:
                    self.job_counter = self.job_counter - 1
                    self.sem.release()

    async def _claim_and_start(self, job_id: str) -> bool:
        """Mark the job in progress (unless it runs elsewhere) and start it: arq 0.28's own steps."""
        in_progress_key = in_progress_key_prefix + job_id
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(in_progress_key)
            ongoing_exists = await pipe.exists(in_progress_key)
            score = await pipe.zscore(self.queue_name, job_id)
            if ongoing_exists or not score or score > timestamp_ms():
                return False  # running elsewhere, finished, or re-enqueued for later
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves Pipeline.multi unannotated
            pipe.psetex(in_progress_key, int(self.in_progress_timeout_s * 1000), b"1")
            try:
                await pipe.execute()
            except (ResponseError, WatchError):
                return False  # started elsewhere since
        task = self.loop.create_task(self.run_job(job_id, int(score)))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task
        return True

    async def _poll_iteration(self) -> None:
        """arq lets a Redis error out of its poll loop, which ends the worker: a Redis restart would
        leave no worker at all. Wait for Redis instead; the drain and timed loops do the same."""
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as error:  # a WatchError can wrap a lost connection too
            log.warning(
                "redis unreachable (%s: %s); polling again in %.0f s", type(error).__name__, error, redis_retry_pause_s
            )
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
