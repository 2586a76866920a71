"""Write orgs into Redis from Postgres snapshots: on creation, after Redis lost its state, on repair.

Two modes, both checked inside org_restore.lua so that a restore can never overwrite a decision
it did not see:
- 'absent': only when the org's hash is missing (a new org, or Redis lost it);
- 'seq': only when the org's change counter still equals the value read before the snapshot
  was taken (a repair of a live org).
Either way the org's outbox must be empty: entries still in it are debits Postgres lacks.

Idempotency records are staged in the same pipeline and taken by the script only if the restore
happens (a refused restore must not rewrite records Redis holds newer than Postgres).

Startup: `ensure_rebuilt` rebuilds every org when the state marker is missing (Redis restarted
without its data), under a lock so that web processes and workers starting together rebuild once.
"""

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from credit_engine.engine import limits
from credit_engine.engine.cluster import is_cluster, master_slots, slot_tag
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.killswitch import file_depletion, reschedule_live_orgs
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.results import Outcome, decode
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.snapshots import OrgSnapshot, load_snapshots, org_id_pages

log = logging.getLogger(__name__)

idem_chunk_size = 1_000  # idempotency records per staging HSET
restore_epoch_max = 2**48  # a random epoch per restore: two restores of one org share one with odds 2**-48
staging_ttl_ms = 10 * 60 * 1000  # a restoring process that dies leaves its staged records this long
rebuild_wait_poll_s = 0.1


def add_restore(rt: Runtime, pipe: Any, snapshot: OrgSnapshot, mode: str, expected_seq: int = 0) -> None:
    keys = rt.keys.org(snapshot.org_id)
    # Every idempotency record is staged, then taken by the script only if the restore happens.
    # The staging hash is the restore's own (a token): two processes restoring one org at once
    # must not take each other's records (a credit in one snapshot's balance is not in the other's).
    staging = keys.restore_staging(secrets.token_hex(8))
    for start in range(0, len(snapshot.idem), idem_chunk_size):
        chunk = snapshot.idem[start : start + idem_chunk_size]
        pipe.hset(staging, mapping={record.field: f"{record.expires_ms}|{record.value}" for record in chunk})
    if snapshot.idem:
        pipe.pexpire(staging, staging_ttl_ms)
    hold_args: list[Any] = []
    for call_id, hold in sorted(snapshot.live_holds.items()):
        hold_args += [call_id, hold.encode()]
    rt.scripts.add_to_pipeline(
        pipe,
        "org_restore",
        [keys.org, keys.holds, keys.outbox, keys.idem, keys.idem_exp, staging],
        [
            rt.clock.script_arg(),
            snapshot.org_id,
            mode,
            expected_seq,
            snapshot.balance_pence,
            snapshot.debt_pence,
            *snapshot.settings.script_args(),
            secrets.randbelow(restore_epoch_max) + 1,
            len(snapshot.live_holds),
            *hold_args,
        ],
    )


async def restore_orgs(
    rt: Runtime, snapshots: list[OrgSnapshot], mode: str, expected_seq: int = 0
) -> dict[str, Outcome]:
    """Restore many orgs in one pipeline. Returns each org's outcome (ok or restore_conflict)."""
    assert mode in ("absent", "seq")
    assert mode == "absent" or len(snapshots) == 1

    def build(pipe: Any) -> None:
        for snapshot in snapshots:
            add_restore(rt, pipe, snapshot, mode, expected_seq)

    replies = await rt.scripts.execute(rt.redis, build)
    script_replies = [reply for reply in replies if isinstance(reply, list)]
    assert len(script_replies) == len(snapshots)
    outcomes = {}
    for snapshot, reply in zip(snapshots, script_replies, strict=True):
        result = decode(reply, tail_length=0)
        if result.outcome == Outcome.ok:
            assert result.money.balance_pence == snapshot.balance_pence
            assert result.money.held_pence == snapshot.held_pence
            await file_depletion(rt, snapshot.org_id, result.depletion_ms)
        outcomes[snapshot.org_id] = result.outcome
    return outcomes


async def snapshot_orgs(rt: Runtime, org_ids: list[str]) -> dict[str, OrgSnapshot]:
    """The orgs as Postgres has them, read at one instant: a credit committed meanwhile is either
    in a snapshot's balance and its records both, or in neither (and then applies itself)."""
    now_ms = await rt.clock.now_ms(rt.redis)
    async with rt.pg.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        return await load_snapshots(conn, org_ids, now_ms, rt.settings.idempotency_ttl_ms)


async def restore_org_if_absent(rt: Runtime, org_id: str) -> Outcome | None:
    """Bring one org into Redis when Redis does not have it. None if Postgres has no such org.

    An org nobody created is asked about cheaply first (one indexed lookup): a webhook naming an
    unknown org would otherwise cost a full snapshot, in a transaction, every time."""
    if not await rt.pg.fetchval("SELECT EXISTS (SELECT 1 FROM orgs WHERE org_id = $1)", org_id):
        return None
    snapshot = (await snapshot_orgs(rt, [org_id])).get(org_id)
    if snapshot is None:
        return None
    outcome = (await restore_orgs(rt, [snapshot], "absent"))[org_id]
    log.info("restored org %s from postgres into redis: %s", org_id, outcome.name)
    return outcome


@dataclass
class RebuildReport:
    orgs_total: int = 0
    orgs_restored: int = 0
    orgs_present: int = 0  # restore_conflict: already in Redis (or its outbox was not empty)
    seconds: float = 0.0
    rebuilt_here: bool = False


def slot_marker_key(keys: Keyspace, slot: int) -> str:
    return f"{keys.state}:{{{slot_tag(slot)}}}"


async def state_marker_keys(redis: Redis, keys: Keyspace) -> list[str]:
    """The keys whose presence says Redis holds the rebuilt state. On a Redis Cluster, besides the
    marker, one per master: the marker of the lowest slot it serves. A rebuild marks every slot
    (mark_every_slot), so a master that restarted empty has lost its own, while a reshard
    moves markers with their slots and a master's new lowest slot is marked as well."""
    if not is_cluster(redis):
        return [keys.state]
    return [keys.state, *[slot_marker_key(keys, slot) for slot in await master_slots(redis)]]


async def markers_present(redis: Redis, keys: Keyspace) -> bool:
    markers = await state_marker_keys(redis, keys)
    return bool(await redis.exists(*markers) == len(markers))


async def state_present(rt: Runtime) -> bool:
    return await markers_present(rt.redis, rt.keys)


async def rebuild_all(rt: Runtime, progress: Callable[[int, int], None] | None = None) -> RebuildReport:
    """Restore every org Postgres knows into Redis ('absent' mode), then set the state marker."""
    report = RebuildReport(rebuilt_here=True)
    started = time.monotonic()
    async with rt.pg.acquire() as conn:
        total = await conn.fetchval("SELECT count(*) FROM orgs")
        pages = [page async for page in org_id_pages(conn, limits.reconcile_page_size)]
    report.orgs_total = total
    done = 0
    for page in pages:
        snapshots = await snapshot_orgs(rt, page)
        outcomes = await restore_orgs(rt, list(snapshots.values()), "absent")
        report.orgs_restored += sum(1 for o in outcomes.values() if o == Outcome.ok)
        report.orgs_present += sum(1 for o in outcomes.values() if o == Outcome.restore_conflict)
        done += len(page)
        if progress is not None:
            progress(done, total)
    now_ms = await rt.clock.now_ms(rt.redis)
    if is_cluster(rt.redis):
        await mark_every_slot(rt)
    # The kill switch's schedule shards that lived on a lost node held orgs of other nodes too,
    # which an 'absent' restore leaves alone: file every org with a live call again now.
    await reschedule_live_orgs(rt)
    await asyncio_reply(rt.redis.hset(rt.keys.state, mapping={"rebuilt_ms": now_ms, "orgs": report.orgs_total}))
    report.seconds = time.monotonic() - started
    return report


async def mark_every_slot(rt: Runtime, chunk: int = 2_048) -> None:
    for start in range(0, REDIS_CLUSTER_HASH_SLOTS, chunk):
        async with rt.redis.pipeline(transaction=False) as pipe:
            for slot in range(start, min(start + chunk, REDIS_CLUSTER_HASH_SLOTS)):
                pipe.set(slot_marker_key(rt.keys, slot), 1)
            await pipe.execute()


async def ensure_rebuilt(rt: Runtime, progress: Callable[[int, int], None] | None = None) -> RebuildReport:
    """If Redis has lost its state, rebuild it from Postgres; concurrent callers rebuild once."""
    if await state_present(rt):
        return RebuildReport()
    token = secrets.token_hex(8)
    deadline = time.monotonic() + limits.rebuild_lock_ttl_ms / 1000
    while time.monotonic() < deadline:
        if await rt.redis.set(rt.keys.rebuild_lock, token, nx=True, px=limits.rebuild_lock_ttl_ms):
            try:
                if await state_present(rt):
                    return RebuildReport()
                log.warning("redis has no state marker: rebuilding every org from postgres")
                report = await rebuild_all(rt, progress)
                log.info(
                    "rebuilt redis from postgres: %d orgs (%d restored, %d already present) in %.2fs",
                    report.orgs_total,
                    report.orgs_restored,
                    report.orgs_present,
                    report.seconds,
                )
                return report
            finally:
                if await rt.redis.get(rt.keys.rebuild_lock) == token:
                    await rt.redis.delete(rt.keys.rebuild_lock)
        if await state_present(rt):
            return RebuildReport()
        await asyncio.sleep(rebuild_wait_poll_s)
    raise TimeoutError("another process held the rebuild lock past its expiry without finishing")
