"""The worker's timed loops beside the outbox drain: the kill switch and alert delivery.

Each loop runs one round, waits as long as the round says (the kill switch: until its next org is
due, at most its poll interval; none when more is due at once) and runs again until stopped; an
error in a round is logged and the next round tries again (Redis or Postgres may be away for a
while), never ending the loop. The kill switch's pushes run as
tasks of their own beside its rounds (engine/killswitch.KillSwitch) and are waited for at close.
Their counters go to one Redis hash that every worker increments, shown by /metrics.
An alert round ends within about one delivery deadline however the orgs' endpoints behave
(engine/alerts.py), so a stop waits for no endpoint.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from credit_engine.engine.alerts import deliver_due, outbound_for_alerts
from credit_engine.engine.control import ControlClients
from credit_engine.engine.killswitch import KillSwitch
from credit_engine.engine.killswitch_push import ControlUrls
from credit_engine.engine.runtime import Runtime
from credit_engine.worker.metrics import METRICS

log = logging.getLogger(__name__)

alert_poll_interval_s = 1.0
error_pause_s = 1.0
close_pushes_timeout_s = 5.0  # at shutdown, pushes still under way after this are cancelled


class TimedLoops:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # Alerts go to URLs orgs chose: their own pool, checked and pinned, each delivery bounded.
        self.outbound = outbound_for_alerts(rt.settings.outbound_allow_private)
        self.control_clients = ControlClients(rt.settings.kill_pushes_in_flight_max)  # the kill switch's pushes
        self.kill_switch = KillSwitch(rt, self.control_clients, ControlUrls(rt))
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        await self.kill_switch.drain(close_pushes_timeout_s)
        try:
            await self._count(**self.kill_switch.take_report().counters())
        except RedisError as error:  # stopping while Redis is away: these few counts are lost
            log.warning("could not count the last pushes at shutdown: %s", error)
        await self.control_clients.aclose()
        await self.outbound.aclose()

    async def run_forever(self) -> None:
        await asyncio.gather(
            self._loop("kill switch", self.kill_switch_round, self.rt.settings.kill_poll_interval_ms / 1000),
            self._loop("alert delivery", self.alert_round, alert_poll_interval_s),
        )

    async def _loop(self, name: str, round_: Callable[[], Awaitable[float]], interval_s: float) -> None:
        """Run rounds until stopped; each says how long to wait before the next (at most interval_s)."""
        # Unbounded on purpose: the worker's loops run until the worker stops them.
        while not self._stopping.is_set():
            try:
                pause_s = min(interval_s, await round_())
            except Exception:
                log.exception("%s round failed; trying again", name)
                pause_s = max(interval_s, error_pause_s)
            if pause_s <= 0:
                continue  # more is due now (the round's own awaits let everything else run)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause_s)
            except TimeoutError:
                pass

    async def kill_switch_round(self) -> float:
        try:
            return await self.kill_switch.round()
        finally:  # what the pushes did since the last round, even if this one failed
            await self._count(**self.kill_switch.take_report().counters())

    async def alert_round(self) -> float:
        report = await deliver_due(self.rt, self.outbound)
        await self._count(
            alerts_delivered=report.delivered,
            alerts_retrying=report.retrying,
            alerts_failed=report.failed,
            alerts_refused=report.refused,
            alerts_no_endpoint=report.no_endpoint,
        )
        return alert_poll_interval_s

    async def _count(self, **counts: int) -> None:
        nonzero = {name: n for name, n in counts.items() if n}
        if not nonzero:
            return
        METRICS.count(**nonzero)  # this worker's counters; Redis keeps the deployment's totals
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            for name, n in nonzero.items():
                pipe.hincrby(self.rt.keys.worker_counters, name, n)
            await pipe.execute()
