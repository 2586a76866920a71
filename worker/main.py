"""Run the worker process: `credit-engine worker`."""

import asyncio

import uvloop

from arq.worker import Worker

from engine.config import Settings


class CreditEngineWorker(Worker):
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
