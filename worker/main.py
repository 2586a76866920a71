"""Run the worker process: `credit-engine worker`."""

import asyncio

import uvloop

from engine.config import Settings
from worker.arq_worker import CreditEngineWorker


def run_worker(settings: Settings) -> None:
    from worker.settings import worker_options

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = CreditEngineWorker(**worker_options(settings))
    worker.run()
