"""The worker's main loop: move outbox entries into the Postgres ledger, continuously.

Which orgs to drain comes from the doorbell (engine/doorbell.py: sets sharded over the cluster's
masters, every shard visited; scripts' callers ring it in the same round trip as the script).
SPOP hands each org to one worker at a time; an org whose stream still has
entries after a batch is rung again. The doorbell is only a hint: the periodic sweep checks
every org's stream, so an entry whose ring was lost (a crash between SPOP and the commit, a
Redis failover) is drained at the next sweep at the latest.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg
from redis.exceptions import RedisError

from credit_engine.engine import limits
from credit_engine.engine.clock import redis_now_ms
from credit_engine.engine.doorbell import pop_rung, ring
from credit_engine.engine.outbox import drain_orgs, outbox_lengths
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.snapshots import org_id_pages
from credit_engine.worker.metrics import METRICS

log = logging.getLogger(__name__)

backoff_s_min = 0.05
backoff_s_max = 5.0
stats_publish_interval_s = 1.0


@dataclass
class DrainStats:
    entries_written: int = 0
    entries_redelivered: int = 0
    entries_duplicate: int = 0
    batches: int = 0
    errors: int = 0
    last_lag_ms: int = 0  # age of the oldest entry in the last batch when it was read
    outbox_entries: int = 0  # all orgs, at the last sweep
    outbox_oldest_age_ms: int = 0  # at the last sweep


class Drainer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.stats = DrainStats()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run_forever(self) -> None:
        """Drain loops side by side: while one waits on Postgres, another reads Redis. SPOP hands
        each org to one loop at a time, and the ledger's per-org row locks make overlap safe anyway."""
        loops = [self._drain_loop() for _ in range(self.rt.settings.worker_drain_loops)]
        await asyncio.gather(*loops)

    async def _drain_loop(self) -> None:
        """The worker's one unbounded loop, on purpose: it runs until the worker stops."""
        poll_s = self.rt.settings.worker_poll_interval_ms / 1000
        backoff_s = backoff_s_min
        published_at = 0.0
        while not self._stopping.is_set():
            try:
                drained = await self.drain_round()
                backoff_s = backoff_s_min
                if time.monotonic() - published_at >= stats_publish_interval_s:
                    await self.publish_stats()
                    published_at = time.monotonic()
            except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                self.stats.errors += 1
                METRICS.drain_errors.inc()
                log.warning("outbox drain failed, retrying in %.2fs: %s", backoff_s, error)
                await self._sleep(backoff_s)
                backoff_s = min(backoff_s * 2, backoff_s_max)
                continue
            except Exception:
                # A bug must not end the drain for every org: log it loudly and go on.
                self.stats.errors += 1
                METRICS.drain_errors.inc()
                log.exception("outbox drain failed unexpectedly, retrying in %.2fs", backoff_s)
                await self._sleep(backoff_s)
                backoff_s = min(backoff_s * 2, backoff_s_max)
                continue
            if drained == 0:
                await self._sleep(poll_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def drain_round(self) -> int:
        """One batch: pop rung orgs, write their entries in one transaction. Returns entries read."""
        rt = self.rt
        org_ids = await pop_rung(rt, limits.settle_orgs_per_batch_max)
        if not org_ids:
            return 0
        try:
            result = await drain_orgs(rt, org_ids)
        except BaseException:
            # Not written: ring again so the next round (or another worker) takes them.
            await ring(rt, org_ids)
            raise
        if result.orgs_with_more:
            await ring(rt, result.orgs_with_more)
        self.stats.batches += 1
        self.stats.entries_written += result.written.inserted
        self.stats.entries_redelivered += result.written.redelivered
        self.stats.entries_duplicate += result.written.duplicates
        METRICS.batches.inc()
        METRICS.entries_written.inc(result.written.inserted)
        METRICS.entries_redelivered.inc(result.written.redelivered)
        METRICS.entries_duplicate.inc(result.written.duplicates)
        if result.oldest_created_ms is not None:
            now_ms = await rt.clock.now_ms(rt.redis)
            self.stats.last_lag_ms = max(0, now_ms - result.oldest_created_ms)
        return result.entries_read

    async def sweep(self) -> int:
        """Ring every org whose outbox is not empty. Returns how many were rung."""
        rt = self.rt
        rung = 0
        total_entries = 0
        oldest_ms: int | None = None
        async with rt.pg.acquire() as conn:
            pages = [page async for page in org_id_pages(conn, limits.outbox_sweep_page_size)]
        for page in pages:
            lengths = await outbox_lengths(rt, page)
            pending = [org_id for org_id, length in lengths.items() if length > 0]
            total_entries += sum(lengths.values())
            if not pending:
                continue
            await ring(rt, pending)
            rung += len(pending)
            async with rt.redis.pipeline(transaction=False) as pipe:
                for org_id in pending:
                    pipe.xrange(rt.keys.org(org_id).outbox, "-", "+", count=1)
                firsts = await pipe.execute()
            for first in firsts:
                if first:
                    created_ms = int(first[0][1]["ms"])
                    oldest_ms = created_ms if oldest_ms is None else min(oldest_ms, created_ms)
        now_ms = await rt.clock.now_ms(rt.redis)
        self.stats.outbox_entries = total_entries
        self.stats.outbox_oldest_age_ms = 0 if oldest_ms is None else max(0, now_ms - oldest_ms)
        METRICS.outbox_entries.set(total_entries)
        METRICS.outbox_oldest_age.set(self.stats.outbox_oldest_age_ms / 1000)
        await self.publish_stats()
        return rung

    async def publish_stats(self) -> None:
        stats = self.stats
        heartbeat_ms = await redis_now_ms(
            self.rt.redis
        )  # not this machine's clock: the web app compares it with its own reading
        await asyncio_reply(
            self.rt.redis.hset(
                self.rt.keys.worker_stats,
                mapping={
                    "heartbeat_ms": heartbeat_ms,
                    "entries_written": stats.entries_written,
                    "entries_redelivered": stats.entries_redelivered,
                    "entries_duplicate": stats.entries_duplicate,
                    "batches": stats.batches,
                    "errors": stats.errors,
                    "last_lag_ms": stats.last_lag_ms,
                    "outbox_entries": stats.outbox_entries,
                    "outbox_oldest_age_ms": stats.outbox_oldest_age_ms,
                },
            )
        )
