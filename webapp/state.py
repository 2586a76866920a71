"""Keeps the web process's view of Redis's state honest: if Redis loses its state while we run
(a restart without persistence), money decisions stop until the reconciler has rebuilt it."""

import asyncio
import logging

from engine.restore import ensure_rebuilt, state_present
from engine.runtime import Runtime

log = logging.getLogger(__name__)

state_poll_interval_s = 1.0


class StateGuard:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.ready = False  # True once Redis holds the rebuilt state

    async def start(self) -> None:
        await ensure_rebuilt(self.rt)
        self.ready = True

    async def watch_forever(self) -> None:
        """Runs for the life of the web process (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(state_poll_interval_s)
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
                log.warning("cannot confirm or rebuild redis state (%s: %s); trying again", type(error).__name__, error)
