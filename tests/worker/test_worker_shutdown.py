"""A SIGTERM that lands while arq books a job in Redis still shuts the worker down cleanly."""

import asyncio
import signal
import warnings
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

from credit_engine.engine.config import Settings
from credit_engine.worker.arq_worker import CreditEngineWorker


async def noop(ctx: dict[str, Any]) -> str:
    return "done"


async def _cancel_during_bookkeeping(
    worker_class: type[Worker], settings: Settings
) -> tuple[BaseException | None, bool]:
    """Run one job, cancel the worker while arq writes its result, and close it as run() would."""
    assert settings.redis_url is not None
    queue = f"{settings.key_prefix}:shutdown-test"
    shut_down = asyncio.Event()
    booking = asyncio.Event()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        shut_down.set()

    worker = worker_class(
        functions=[func(noop, name="noop")],
        redis_settings=RedisSettings.from_dsn(settings.arq_url),
        queue_name=queue,
        on_shutdown=on_shutdown,
        handle_signals=True,
        poll_delay=0.05,
    )

    async def slow_finish_job(*args: Any, **kwargs: Any) -> None:
        booking.set()
        await asyncio.sleep(30)

    worker.finish_job = slow_finish_job  # type: ignore[method-assign]
    pool = await create_pool(RedisSettings.from_dsn(settings.arq_url), default_queue_name=queue)
    try:
        await pool.enqueue_job("noop", _queue_name=queue)
        main = asyncio.ensure_future(worker.async_run())
        worker.main_task = main  # as run() would have it
        await asyncio.wait_for(booking.wait(), 10)
        worker.handle_sig(signal.SIGTERM)
        await asyncio.gather(main, return_exceptions=True)
        error: BaseException | None = None
        try:
            with warnings.catch_warnings():  # arq closes its pool with redis-py's deprecated close()
                warnings.simplefilter("ignore", DeprecationWarning)
                await worker.close()
        except BaseException as e:  # CancelledError is what stock arq raises here
            error = e
        return error, shut_down.is_set()
    finally:
        if worker._pool is not None:  # left open when close() raised
            await worker._pool.aclose()
        await pool.delete(queue)
        await pool.aclose()


async def test_a_job_cancelled_mid_bookkeeping_does_not_skip_on_shutdown(settings: Settings) -> None:
    error, shut_down = await _cancel_during_bookkeeping(CreditEngineWorker, settings)
    assert error is None
    assert shut_down


async def test_stock_arq_would_exit_with_cancelled_error_there(settings: Settings) -> None:
    """The reason CreditEngineWorker exists; if arq fixes this, this test says the override can go."""
    error, shut_down = await _cancel_during_bookkeeping(Worker, settings)
    assert isinstance(error, asyncio.CancelledError)
    assert not shut_down


class _BrokenPipeline:
    """A pipeline whose WATCH fails as a dropped connection does."""

    async def __aenter__(self) -> "_BrokenPipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def watch(self, *keys: str) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError

        raise RedisConnectionError("Connection closed by server.")


class _BrokenPool:
    def pipeline(self, transaction: bool = True) -> _BrokenPipeline:
        return _BrokenPipeline()


async def _slots_after_failed_claims(worker_class: type[Worker], settings: Settings) -> tuple[int, int]:
    assert settings.redis_url is not None
    worker = worker_class(
        functions=[func(noop, name="noop")],
        redis_settings=RedisSettings.from_dsn(settings.arq_url),
        queue_name=f"{settings.key_prefix}:slots-test",
        max_jobs=3,
        handle_signals=False,
    )
    worker._pool = _BrokenPool()  # type: ignore[assignment]
    for attempt in range(5):
        try:
            await worker.start_jobs([f"job-{attempt}".encode()])
        except Exception:
            pass
    return worker.job_counter, worker.sem._value  # type: ignore[attr-defined]


async def test_a_claim_that_fails_in_redis_gives_its_job_slot_back(settings: Settings) -> None:
    assert await _slots_after_failed_claims(CreditEngineWorker, settings) == (
        0,
        3 + 1,
    )  # arq's semaphore has max_jobs + 1


async def test_stock_arq_would_leak_the_slot_there(settings: Settings) -> None:
    counter, free = await _slots_after_failed_claims(Worker, settings)
    assert counter == 3 and free == 1  # job_counter at max_jobs: this worker would never start a job again
