"""The outbox: each org's Redis stream of ledger entries and hold events not yet in Postgres.

Scripts append to it in the same atomic step as the balance change (lua/_outbox.lua). Draining:
read entries, write them in one Postgres transaction (engine/ledger.py), and only after COMMIT
delete them from the stream. A crash anywhere before the delete re-delivers the entries, and
the writer recognises them as already written, so nothing is written twice or lost.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from credit_engine.engine import faults, limits
from credit_engine.engine.ledger import (
    AlertEvent,
    BatchResult,
    HoldEvent,
    LedgerEntry,
    UnknownOrg,
    UnwritableEntry,
    write_batch,
)
from credit_engine.engine.records import HoldRecord
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.types import EntryKind, HoldStatus

log = logging.getLogger(__name__)

OutboxItem = LedgerEntry | HoldEvent | AlertEvent
KINDS = {kind.value: kind for kind in EntryKind}  # a dict lookup: EntryKind(value) is slow per entry
STATUSES = {status.value: status for status in HoldStatus}

# Errors that belong to the entries themselves (not to a Postgres outage): retrying the same
# batch cannot help. The org's entries are then written one at a time and the one the ledger
# refuses is moved to the org's dead-letter stream, so it blocks neither its org nor anyone else.
POISON_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, UnwritableEntry)


def parse_entry(stream_id: str, fields: dict[str, str]) -> OutboxItem:
    kind = fields["t"]
    if kind == "L":
        meta: dict[str, Any] = orjson.loads(fields["m"]) if fields.get("m") else {}
        return LedgerEntry(
            stream_id=stream_id,
            org_id=fields["o"],
            idempotency_key=fields["k"],
            kind=KINDS[fields["kind"]],
            amount_pence=int(fields["a"]),
            debt_delta_pence=int(fields["dd"]),
            redis_balance_after_pence=int(fields["b"]),
            redis_debt_after_pence=int(fields["db"]),
            call_id=fields["c"] or None,
            billed_seconds=int(fields["bs"]),
            rate_pence_per_minute=int(fields["r"]),
            fingerprint=fields["fp"],
            meta=meta,
            created_ms=int(fields["ms"]),
            seq=int(fields["s"]),
        )
    if kind == "A":
        return AlertEvent(
            stream_id=stream_id,
            org_id=fields["o"],
            idempotency_key=fields["k"],
            kind=fields["kind"],
            call_id=fields["c"] or None,
            balance_pence=int(fields["b"]),
            available_pence=int(fields["av"]),
            threshold_pence=int(fields["th"]),
            created_ms=int(fields["ms"]),
            seq=int(fields["s"]),
        )
    assert kind == "H", fields
    return HoldEvent(
        stream_id=stream_id,
        org_id=fields["o"],
        call_id=fields["c"],
        status=STATUSES[fields["st"]],
        hold=HoldRecord.decode(fields["h"]),
        charged_pence=int(fields["ch"]),
        billed_seconds=int(fields["bs"]),
        created_ms=int(fields["ms"]),
        seq=int(fields["s"]),
    )


def per_org_read_max(org_count: int, entries_max: int) -> int:
    """How many entries to read from each org's outbox in one batch."""
    assert org_count > 0
    assert entries_max > 0
    return max(1, entries_max // org_count)


# What a malformed entry raises while being parsed (a field missing, a number that is not one,
# meta that is not JSON): it belongs to that entry alone.
MALFORMED_ERRORS = (KeyError, ValueError, AssertionError, orjson.JSONDecodeError)


async def read_outboxes(
    rt: Runtime, org_ids: list[str], entries_max: int
) -> tuple[dict[str, list[OutboxItem]], list[str]]:
    """Read up to `entries_max` entries in all, oldest first within each org. Returns the entries
    by org and the orgs whose read was cut at their share (more may be waiting). An entry that
    cannot be parsed is moved to its org's dead letters at once (with the reason), so it stalls
    neither its own org nor the others read in the same batch."""
    per_org_max = per_org_read_max(len(org_ids), entries_max)
    async with rt.redis.pipeline(transaction=False) as pipe:
        for org_id in org_ids:
            pipe.xrange(rt.keys.org(org_id).outbox, "-", "+", count=per_org_max)
        replies = await pipe.execute()
    items_by_org: dict[str, list[OutboxItem]] = {}
    cut = [org_id for org_id, reply in zip(org_ids, replies, strict=True) if len(reply) >= per_org_max]
    for org_id, reply in zip(org_ids, replies, strict=True):
        items = []
        for stream_id, fields in reply:
            try:
                items.append(parse_entry(stream_id, fields))
            except MALFORMED_ERRORS as error:
                reason = f"malformed entry: {type(error).__name__}: {error}"
                log.error(
                    "outbox entry %s of org %s cannot be read, moved to its dead letters: %s", stream_id, org_id, reason
                )
                await dead_letter(rt, org_id, stream_id, reason)
        if items:
            items_by_org[org_id] = items
    return items_by_org, cut


@dataclass
class DrainResult:
    written: BatchResult = field(default_factory=BatchResult)
    entries_read: int = 0
    orgs_with_more: list[str] = field(default_factory=list)  # their outbox still has entries
    orgs_failed: list[str] = field(default_factory=list)  # Postgres has no such org: entries stay in the outbox
    orgs_dead_lettered: list[str] = field(default_factory=list)  # an entry was moved to the dead letters
    oldest_created_ms: int | None = None


async def drain_orgs(rt: Runtime, org_ids: list[str], entries_max: int = limits.settle_batch_size_max) -> DrainResult:
    """Move what the orgs' outboxes hold into Postgres (one transaction), then delete it from Redis."""
    result = DrainResult()
    items_by_org, cut = await read_outboxes(rt, org_ids, entries_max)
    # An org whose read was cut at its share may have more waiting. (An entry appended after the
    # read rings the doorbell itself, so nothing else needs looking at.)
    result.orgs_with_more = cut
    if not items_by_org:
        return result
    result.entries_read = sum(len(items) for items in items_by_org.values())
    result.oldest_created_ms = min(item.created_ms for items in items_by_org.values() for item in items)
    try:
        result.written = await _write(rt, items_by_org)
        done = items_by_org
    except (*POISON_ERRORS, UnknownOrg):
        done = {}
        for org_id, items in items_by_org.items():
            try:
                written, kept = await _write_one_by_one(rt, org_id, items)
            except UnknownOrg as error:
                # Postgres has no such org: every entry is kept where it is, loudly.
                log.error("outbox of org %s cannot be written: %s", org_id, error)
                result.orgs_failed.append(org_id)
                continue
            result.written.add(written)
            done[org_id] = kept
            if len(kept) < len(items):
                result.orgs_dead_lettered.append(org_id)
    faults.reached("outbox.after_commit")  # crash tests: committed, not yet deleted from Redis
    await _acknowledge(rt, done)
    return result


async def _write_one_by_one(rt: Runtime, org_id: str, items: list[OutboxItem]) -> tuple[BatchResult, list[OutboxItem]]:
    """The slow path after a refused batch: each entry in its own transaction, in stream order.
    Returns what was written and the entries to delete from the outbox (the written ones)."""
    written = BatchResult()
    done: list[OutboxItem] = []
    for item in items:
        try:
            written.add(await _write(rt, {org_id: [item]}))
            done.append(item)
        except POISON_ERRORS as error:
            reason = f"{type(error).__name__}: {error}"
            log.error(
                "outbox entry %s of org %s refused by the ledger, moved to its dead letters: %s",
                item.stream_id,
                org_id,
                reason,
            )
            await dead_letter(rt, org_id, item.stream_id, reason)
    return written, done


async def dead_letter(rt: Runtime, org_id: str, stream_id: str, reason: str) -> None:
    keys = rt.keys.org(org_id)
    await rt.scripts.run(rt.redis, "outbox_dead_letter", [keys.outbox, keys.dead], [stream_id, reason])


async def _write(rt: Runtime, items_by_org: dict[str, list[OutboxItem]]) -> BatchResult:
    entries = [item for items in items_by_org.values() for item in items if isinstance(item, LedgerEntry)]
    events = [item for items in items_by_org.values() for item in items if isinstance(item, HoldEvent)]
    alerts = [item for items in items_by_org.values() for item in items if isinstance(item, AlertEvent)]
    async with rt.pg.acquire() as conn:
        return await write_batch(conn, entries, events, alerts)


async def _acknowledge(rt: Runtime, done: dict[str, list[OutboxItem]]) -> None:
    """Delete committed entries from the streams."""
    async with rt.redis.pipeline(transaction=False) as pipe:
        for org_id, items in done.items():
            if items:
                pipe.xdel(rt.keys.org(org_id).outbox, *[item.stream_id for item in items])
        await pipe.execute()


async def outbox_lengths(rt: Runtime, org_ids: list[str]) -> dict[str, int]:
    async with rt.redis.pipeline(transaction=False) as pipe:
        for org_id in org_ids:
            pipe.xlen(rt.keys.org(org_id).outbox)
        lengths = await pipe.execute()
    return dict(zip(org_ids, lengths, strict=True))


async def drain_org_fully(rt: Runtime, org_id: str, rounds_max: int = 1_000) -> int:
    """Drain one org until its outbox is empty (the reconciler's repair). Returns entries read."""
    total = 0
    for _ in range(rounds_max):
        result = await drain_orgs(rt, [org_id])
        total += result.entries_read
        if result.orgs_failed:
            raise RuntimeError(f"outbox of org {org_id} cannot be written to the ledger; see the log")
        if not result.orgs_with_more:
            return total
    raise RuntimeError(f"outbox of org {org_id} still not empty after {rounds_max} rounds")


# At most one log line per org in this long while its outbox stays full: the outage that fills it
# (Postgres or the worker away) would otherwise flood the log with one line per refused decision.
full_log_interval_s = 10.0
_full_logged_at: dict[str, float] = {}


def note_refused_for_full_outbox(org_id: str, operation: str, outbox_max: int) -> None:
    """A new debit or hold was refused because the org's outbox is at its bound (fail closed)."""
    now = time.monotonic()
    if now - _full_logged_at.get(org_id, -full_log_interval_s) < full_log_interval_s:
        return
    _full_logged_at[org_id] = now
    log.error(
        "outbox of org %s is full (%d entries, CREDIT_ENGINE_OUTBOX_PER_ORG_MAX): refusing new debits and holds "
        "(%s refused) until the ledger catches up; is Postgres or the worker down?",
        org_id,
        outbox_max,
        operation,
    )
