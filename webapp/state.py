"""Keeps the web process's view of Redis's state honest: if Redis loses its state while we run
(a restart without persistence), money decisions stop until the reconciler has rebuilt it."""

import asyncio
import contextlib
import logging

from credit_engine.engine.restore import ensure_rebuilt, state_present
from credit_engine.engine.runtime import Runtime

log = logging.getLogger(__name__)

state_poll_interval_s = 1.0


class StateGuard:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.ready = False  # True once Redis holds the rebuilt state
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def start(self) -> None:
        await ensure_rebuilt(self.rt)
        self.ready = True

    async def watch_forever(self) -> None:
        """Runs for the life of the web process: until stop(), or until cancelled."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), state_poll_interval_s)
            if self._stopping.is_set():
                return
            try:
                if await state_present(self.rt):
                    self.ready = True
                    continue
                self.ready = False
                log.warning("redis lost its state: refusing money decisions until it is rebuilt")
                await ensure_rebuilt(self.rt)
                self.ready = True
            except Exception as error:  # noqa: BLE001 - this loop must outlive any outage
                # Not only Redis: a rebuild needs Postgres, which may be down or starting up
                # (asyncpg's CannotConnectNowError). Ending here would refuse every decision forever.
                self.ready = False
                task = asyncio.current_task()
                if self._stopping.is_set() or (task is not None and task.cancelling()):
                    # A shutdown's cancel that a client library turned into an error of its own
                    # must still end the loop, or the process never exits.
                    raise asyncio.CancelledError from error
                log.warning("cannot confirm or rebuild redis state (%s: %s); trying again", type(error).__name__, error)
