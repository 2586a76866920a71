"""Run the worker process: `credit-engine worker`."""

import asyncio

import uvloop

from arq.worker import Worker

from engine.config import Settings


def run_worker(settings: Settings) -> None:
    from worker.settings import worker_options

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(**worker_options(settings))
    worker.run()
