"""Run the worker process: `credit-engine worker`."""

import asyncio

import uvloop

from credit_engine.engine.config import Settings
from credit_engine.worker.arq_worker import CreditEngineWorker


def run_worker(settings: Settings) -> None:
    from credit_engine.worker.settings import worker_options

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = CreditEngineWorker(**worker_options(settings))
    worker.run()
