"""The worker's timed loops beside the outbox drain: the kill switch and alert delivery.

Each loop runs one round, sleeps, and runs again until stopped; an error in a round is logged
and the next round tries again (Redis or Postgres may be away for a while), never ending the
loop. Their counters go to one Redis hash that every worker increments, shown by /metrics.
An alert round ends within about one delivery deadline however the orgs' endpoints behave
(engine/alerts.py), so a stop waits for no endpoint.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from engine.alerts import deliver_due, outbound_for_alerts
from engine.killswitch import ControlUrls, run_round
from engine.runtime import Runtime

log = logging.getLogger(__name__)

alert_poll_interval_s = 1.0
error_pause_s = 1.0


class TimedLoops:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.http = httpx.AsyncClient(follow_redirects=False)
        # Alerts go to URLs orgs chose: their own pool, checked and pinned, each delivery bounded.
        self.outbound = outbound_for_alerts(rt.settings.outbound_allow_private)
        self.control_urls = ControlUrls(rt)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        await self.http.aclose()
        await self.outbound.aclose()

    async def run_forever(self) -> None:
        await asyncio.gather(
            self._loop("kill switch", self.kill_switch_round, self.rt.settings.kill_poll_interval_ms / 1000),
            self._loop("alert delivery", self.alert_round, alert_poll_interval_s),
        )

    async def _loop(self, name: str, round_: Callable[[], Awaitable[None]], interval_s: float) -> None:
        while not self._stopping.is_set():
            pause_s = interval_s
            try:
                await round_()
            except Exception:
                log.exception("%s round failed; trying again", name)
                pause_s = max(interval_s, error_pause_s)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause_s)
            except TimeoutError:
                pass

    async def kill_switch_round(self) -> None:
        report = await run_round(self.rt, self.http, self.control_urls)
        await self._count(kill_warned=report.warned, kill_ended=report.ended,
                          kill_failed_attempts=report.failed_attempts, kill_given_up=report.given_up)  # fmt: skip

    async def alert_round(self) -> None:
        report = await deliver_due(self.rt, self.outbound)
        await self._count(alerts_delivered=report.delivered, alerts_retrying=report.retrying,
                          alerts_failed=report.failed, alerts_refused=report.refused,
                          alerts_no_endpoint=report.no_endpoint)  # fmt: skip

    async def _count(self, **counts: int) -> None:
        nonzero = {name: n for name, n in counts.items() if n}
        if not nonzero:
            return
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            for name, n in nonzero.items():
                pipe.hincrby(self.rt.keys.worker_counters, name, n)
            await pipe.execute()
