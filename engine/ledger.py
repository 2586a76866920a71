"""The ledger writer: outbox entries into Postgres, exactly once, one transaction per batch.

In one transaction:
1. lock the projection rows (org_balances) of every org in the batch, in org_id order, so two
   writers (or a writer and a top-up) serialise per org and never deadlock;
2. look up which idempotency keys the ledger already has. Under the locks that answer is stable.
   An entry already there is either a redelivery (the same entry: a writer crashed between COMMIT
   and deleting it from the stream) and is skipped, or a duplicate (the same key, a different
   entry: Redis decided twice) and is recorded in ledger_rejects, never written twice;
3. insert the new entries in stream order, each with balance_after/debt_after continuing its
   org's chain (a trigger checks the chain row by row);
4. move each org's projection to its last entry (a deferred trigger checks it at COMMIT);
5. upsert the hold events into call_holds, following the hold state machine;
6. insert the alerts into alert_events (once per key; the worker delivers them from there).
`INSERT ... ON CONFLICT (idempotency_key) DO NOTHING` stays as the last line of defence; if it
ever skipped a row, the chain trigger would fail the transaction rather than let it pass.

Credits (top-ups, refunds) are Postgres-first and come one at a time: engine/credits.py decides
them under its org's projection lock and writes them through `write_credit`. Every entry the
ledger gets, and every move of a projection, is written here (engine/orgs.py only creates an
org's projection row, at zero).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from credit_engine.engine import faults
from credit_engine.engine.records import HoldRecord
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.timeutil import dt_from_ms, ms_from_dt
from credit_engine.engine.types import EntryKind, HoldStatus


# Slotted and not frozen: the writer builds tens of thousands of these a second, and a frozen
# dataclass pays an object.__setattr__ per field. Nothing mutates them after parsing.
@dataclass(slots=True)
class LedgerEntry:
    stream_id: str
    org_id: str
    idempotency_key: str
    kind: EntryKind
    amount_pence: int  # change to balance_pence
    debt_delta_pence: int  # change to debt_pence
    redis_balance_after_pence: int
    redis_debt_after_pence: int
    call_id: str | None
    billed_seconds: int
    rate_pence_per_minute: int
    fingerprint: str
    meta: dict[str, Any]
    created_ms: int
    seq: int

    def same_decision_as(self, row: asyncpg.Record) -> bool:
        return (
            row["kind"] == self.kind.value
            and row["amount_pence"] == self.amount_pence
            and row["debt_delta_pence"] == self.debt_delta_pence
            and row["redis_seq"] == self.seq
            and ms_from_dt(row["created_at"]) == self.created_ms
        )

    def ledger_meta(self) -> str:
        meta = dict(self.meta)
        if self.fingerprint:
            meta["fingerprint"] = self.fingerprint
        meta["redis"] = {
            "balance_after_pence": self.redis_balance_after_pence,
            "debt_after_pence": self.redis_debt_after_pence,
            "stream_id": self.stream_id,
        }
        # Postgres's jsonb refuses the NUL character; nothing we record needs it. It is stripped
        # from the values themselves: editing the encoded text could cut an escape sequence in
        # two (a value holding the six characters \u0000) and leave JSON that is not JSON.
        encoded = orjson.dumps(meta)
        if b"\\u0000" in encoded:  # rare: only then walk the values
            encoded = orjson.dumps(without_nul(meta))
        return encoded.decode()


def without_nul(value: Any) -> Any:
    """A JSON value with every NUL character removed from its strings (keys included)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


@dataclass(slots=True)
class HoldEvent:
    stream_id: str
    org_id: str
    call_id: str
    status: HoldStatus
    hold: HoldRecord
    charged_pence: int
    billed_seconds: int
    created_ms: int
    seq: int


@dataclass(slots=True)
class AlertEvent:
    """An alert for the org's webhook, decided in Redis with the change that caused it."""

    stream_id: str
    org_id: str
    idempotency_key: str
    kind: str  # low_balance | balance_exhausted | call_ended_no_credit | end_call_failed
    call_id: str | None
    balance_pence: int
    available_pence: int
    threshold_pence: int
    created_ms: int
    seq: int

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.idempotency_key,
            "type": self.kind,
            "org_id": self.org_id,
            "balance_pence": self.balance_pence,
            "available_pence": self.available_pence,
            "at_ms": self.created_ms,
        }
        if self.kind == "low_balance":
            body["threshold_pence"] = self.threshold_pence
        if self.call_id:
            body["call_id"] = self.call_id
        return body


@dataclass
class BatchResult:
    inserted: int = 0
    redelivered: int = 0
    duplicates: int = 0
    hold_events: int = 0
    alerts: int = 0
    orgs: set[str] = field(default_factory=set)

    def add(self, other: "BatchResult") -> None:
        self.inserted += other.inserted
        self.redelivered += other.redelivered
        self.duplicates += other.duplicates
        self.hold_events += other.hold_events
        self.alerts += other.alerts
        self.orgs |= other.orgs


LOCK_PROJECTIONS_SQL = """
SELECT org_id, balance_pence, debt_pence FROM org_balances
WHERE org_id = ANY($1::text[]) ORDER BY org_id FOR UPDATE
"""

EXISTING_SQL = """
SELECT idempotency_key, kind, amount_pence, debt_delta_pence, redis_seq, created_at
FROM ledger_entries WHERE idempotency_key = ANY($1::text[])
"""

INSERT_SQL = """
INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, debt_delta_pence,
    balance_after_pence, debt_after_pence, call_id, billed_seconds, rate_pence_per_minute,
    source, redis_seq, created_at, meta)
SELECT u.org_id, u.key, u.kind, u.amount, u.debt_delta, u.balance_after, u.debt_after, u.call_id,
       u.billed, u.rate, 'redis', u.seq, u.created_at, u.meta::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::bigint[], $8::text[], $9::int[], $10::int[], $11::bigint[], $12::timestamptz[],
            $13::text[])
     WITH ORDINALITY AS u(org_id, key, kind, amount, debt_delta, balance_after, debt_after,
                          call_id, billed, rate, seq, created_at, meta, n)
ORDER BY u.n
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id, org_id
"""

UPDATE_PROJECTIONS_SQL = """
UPDATE org_balances b
SET balance_pence = u.balance, debt_pence = u.debt, entry_count = b.entry_count + u.n,
    last_entry_id = u.last_id, updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
     AS u(org_id, balance, debt, n, last_id)
WHERE b.org_id = u.org_id
"""

REJECT_SQL = """
INSERT INTO ledger_rejects (org_id, idempotency_key, reason, entry)
SELECT u.org_id, u.key, u.reason, u.entry
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(org_id, key, reason, entry)
"""

# Hold events follow the state machine: a live row takes newer live versions and any
# resolution; a released or expired row takes only the commit of a late report (an adjustment,
# which changes the money columns, not the hold's). Older or repeated events change nothing.
UPSERT_HOLDS_SQL = """
INSERT INTO call_holds AS h (org_id, call_id, status, hold_pence, rate_pence_per_minute, created_at,
    started_at, last_seen_at, expires_at, max_duration_seconds, version, charged_pence,
    billed_seconds, resolved_at, ended_at, updated_at)
SELECT u.org_id, u.call_id, u.status, u.hold, u.rate, u.created_at, u.started_at, u.last_seen_at,
       u.expires_at, u.max_duration, u.version, u.charged, u.billed, u.resolved_at, u.ended_at, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::timestamptz[],
            $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::int[], $11::int[],
            $12::bigint[], $13::int[], $14::timestamptz[], $15::timestamptz[])
     AS u(org_id, call_id, status, hold, rate, created_at, started_at, last_seen_at, expires_at,
          max_duration, version, charged, billed, resolved_at, ended_at)
ON CONFLICT (org_id, call_id) DO UPDATE SET
    status = EXCLUDED.status,
    charged_pence = EXCLUDED.charged_pence,
    billed_seconds = EXCLUDED.billed_seconds,
    resolved_at = EXCLUDED.resolved_at,
    hold_pence = CASE WHEN h.status = 'live' THEN EXCLUDED.hold_pence ELSE h.hold_pence END,
    started_at = CASE WHEN h.status = 'live' THEN EXCLUDED.started_at ELSE h.started_at END,
    last_seen_at = CASE WHEN h.status = 'live' THEN EXCLUDED.last_seen_at ELSE h.last_seen_at END,
    expires_at = CASE WHEN h.status = 'live' THEN EXCLUDED.expires_at ELSE h.expires_at END,
    ended_at = CASE WHEN h.status = 'live' THEN EXCLUDED.ended_at ELSE h.ended_at END,
    version = CASE WHEN h.status = 'live' THEN EXCLUDED.version ELSE h.version END,
    updated_at = now()
WHERE (h.status = 'live' AND (EXCLUDED.status <> 'live' OR EXCLUDED.version > h.version))
   OR (h.status IN ('released', 'expired') AND EXCLUDED.status = 'committed')
"""


INSERT_ALERTS_SQL = """
INSERT INTO alert_events (org_id, idempotency_key, kind, call_id, payload, created_at)
SELECT u.org_id, u.key, u.kind, u.call_id, u.payload::jsonb, u.created_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
     AS u(org_id, key, kind, call_id, payload, created_at)
ON CONFLICT (idempotency_key) DO NOTHING
"""


def _alert_columns(alerts: Sequence[AlertEvent]) -> list[list[Any]]:
    return [
        [a.org_id for a in alerts],
        [a.idempotency_key for a in alerts],
        [a.kind for a in alerts],
        [a.call_id for a in alerts],
        [orjson.dumps(a.payload()).decode() for a in alerts],
        [dt_from_ms(a.created_ms) for a in alerts],
    ]


class UnknownOrg(LookupError):
    """An outbox names an org Postgres does not have."""


class UnwritableEntry(ValueError):
    """An entry the ledger cannot take as it stands (e.g. it would take Postgres's debt below
    zero: Redis decided something Postgres refused earlier). Kept aside, never forced in."""


async def write_batch(
    conn: asyncpg.Connection, entries: list[LedgerEntry], events: list[HoldEvent], alerts: Sequence[AlertEvent] = ()
) -> BatchResult:
    result = BatchResult()
    org_ids = sorted({e.org_id for e in entries} | {e.org_id for e in events} | {a.org_id for a in alerts})
    result.orgs = set(org_ids)
    async with conn.transaction():
        projections = {
            row["org_id"]: [row["balance_pence"], row["debt_pence"]]
            for row in await conn.fetch(LOCK_PROJECTIONS_SQL, org_ids)
        }
        missing = set(org_ids) - set(projections)
        if missing:
            raise UnknownOrg(f"outbox entries for orgs postgres does not have: {sorted(missing)}")
        rows, rejects = await _plan_inserts(conn, entries, projections, result)
        if rows:
            await _insert(conn, rows, projections)
            result.inserted = len(rows)
        if rejects:
            await conn.execute(REJECT_SQL, *zip(*rejects, strict=True))
        for layer in _event_layers(events):
            await conn.execute(UPSERT_HOLDS_SQL, *_hold_columns(layer))
        result.hold_events = len(events)
        if alerts:
            await conn.execute(INSERT_ALERTS_SQL, *_alert_columns(alerts))
            result.alerts = len(alerts)
        faults.reached("ledger.before_commit")  # crash tests: everything written, nothing committed
    return result


CREDIT_INSERT_SQL = """
INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, debt_delta_pence,
    balance_after_pence, debt_after_pence, source, created_at, meta)
VALUES ($1, $2, $3, $4, 0, $5, $6, 'postgres', now(), $7::jsonb)
RETURNING id
"""

CREDIT_PROJECTION_SQL = """
UPDATE org_balances SET balance_pence = $2, entry_count = entry_count + 1,
       last_entry_id = $3, updated_at = now()
WHERE org_id = $1
"""


async def write_credit(
    conn: asyncpg.Connection,
    org_id: str,
    idempotency_key: str,
    kind: EntryKind,
    amount_pence: int,
    balance_pence_after: int,
    debt_pence_after: int,
    meta: dict[str, Any] | None,
) -> int:
    """A credit's entry (Postgres-first: engine/credits.py), and its org's projection moved to it.
    In the caller's transaction, which holds the org's projection row (FOR UPDATE) and has checked
    that the key is new and the balance after is within bounds. Returns the entry's id."""
    entry_id: int = await conn.fetchval(
        CREDIT_INSERT_SQL,
        org_id,
        idempotency_key,
        kind.value,
        amount_pence,
        balance_pence_after,
        debt_pence_after,
        meta or {},  # the pool's jsonb codec encodes it
    )
    await conn.execute(CREDIT_PROJECTION_SQL, org_id, balance_pence_after, entry_id)
    return entry_id


async def _plan_inserts(
    conn: asyncpg.Connection,
    entries: list[LedgerEntry],
    projections: dict[str, list[int]],
    result: BatchResult,
) -> tuple[list[tuple[LedgerEntry, int, int]], list[tuple[str, str, str, str]]]:
    existing = {
        row["idempotency_key"]: row for row in await conn.fetch(EXISTING_SQL, [e.idempotency_key for e in entries])
    }
    planned: dict[str, LedgerEntry] = {}
    rows: list[tuple[LedgerEntry, int, int]] = []
    rejects: list[tuple[str, str, str, str]] = []
    for entry in entries:
        prior_row = existing.get(entry.idempotency_key)
        prior_entry = planned.get(entry.idempotency_key)
        if prior_row is not None or prior_entry is not None:
            same = entry.same_decision_as(prior_row) if prior_row is not None else entry == prior_entry
            if same:
                result.redelivered += 1
            else:
                result.duplicates += 1
                rejects.append((entry.org_id, entry.idempotency_key, "duplicate_idempotency_key", _entry_json(entry)))
            continue
        projection = projections[entry.org_id]
        if projection[1] + entry.debt_delta_pence < 0:
            raise UnwritableEntry(
                f"{entry.idempotency_key} would take org {entry.org_id}'s debt below zero in postgres"
            )
        projection[0] += entry.amount_pence
        projection[1] += entry.debt_delta_pence
        rows.append((entry, projection[0], projection[1]))
        planned[entry.idempotency_key] = entry
    return rows, rejects


async def _insert(
    conn: asyncpg.Connection, rows: list[tuple[LedgerEntry, int, int]], projections: dict[str, list[int]]
) -> None:
    inserted = await conn.fetch(
        INSERT_SQL,
        [e.org_id for e, _, _ in rows],
        [e.idempotency_key for e, _, _ in rows],
        [e.kind.value for e, _, _ in rows],
        [e.amount_pence for e, _, _ in rows],
        [e.debt_delta_pence for e, _, _ in rows],
        [balance for _, balance, _ in rows],
        [debt for _, _, debt in rows],
        [e.call_id for e, _, _ in rows],
        [e.billed_seconds if e.call_id else None for e, _, _ in rows],
        [e.rate_pence_per_minute if e.call_id else None for e, _, _ in rows],
        [e.seq for e, _, _ in rows],
        [dt_from_ms(e.created_ms) for e, _, _ in rows],
        [e.ledger_meta() for e, _, _ in rows],
    )
    # Under the locks nothing else can insert these keys, so every row must have gone in.
    assert len(inserted) == len(rows), (len(inserted), len(rows))
    counts: dict[str, int] = {}
    last_ids: dict[str, int] = {}
    for row in inserted:
        counts[row["org_id"]] = counts.get(row["org_id"], 0) + 1
        last_ids[row["org_id"]] = max(last_ids.get(row["org_id"], 0), row["id"])
    org_ids = sorted(counts)
    await conn.execute(
        UPDATE_PROJECTIONS_SQL,
        org_ids,
        [projections[o][0] for o in org_ids],
        [projections[o][1] for o in org_ids],
        [counts[o] for o in org_ids],
        [last_ids[o] for o in org_ids],
    )


def _entry_json(entry: LedgerEntry) -> str:
    fields = {k: getattr(entry, k) for k in entry.__slots__ if k != "kind"}
    return orjson.dumps({**fields, "kind": entry.kind.value}).decode()


def _event_layers(events: list[HoldEvent]) -> list[list[HoldEvent]]:
    """Split events so no layer has two events of one call (one upsert cannot touch a row twice);
    layers run in order, so each call's events apply in stream order."""
    layers: list[list[HoldEvent]] = []
    depth: dict[tuple[str, str], int] = {}
    for event in events:
        key = (event.org_id, event.call_id)
        level = depth.get(key, 0)
        depth[key] = level + 1
        if level == len(layers):
            layers.append([])
        layers[level].append(event)
    return layers


def _hold_columns(events: list[HoldEvent]) -> list[list[Any]]:
    def started(e: HoldEvent) -> Any:
        return dt_from_ms(e.hold.started_ms) if e.hold.started_ms > 0 else None

    resolved = [e.status != HoldStatus.live for e in events]
    return [
        [e.org_id for e in events],
        [e.call_id for e in events],
        [e.status.value for e in events],
        [e.hold.hold_pence for e in events],
        [e.hold.rate_pence_per_minute for e in events],
        [dt_from_ms(e.hold.created_ms) for e in events],
        [started(e) for e in events],
        [dt_from_ms(e.hold.last_seen_ms) for e in events],
        [dt_from_ms(e.hold.expires_ms) for e in events],
        [e.hold.max_duration_s for e in events],
        [e.hold.version for e in events],
        [e.charged_pence if r else None for e, r in zip(events, resolved, strict=True)],
        [e.billed_seconds if r else None for e, r in zip(events, resolved, strict=True)],
        [dt_from_ms(e.created_ms) if r else None for e, r in zip(events, resolved, strict=True)],
        [dt_from_ms(e.hold.ended_ms) if e.hold.ended_ms > 0 else None for e in events],
    ]


async def ledger_page(rt: Runtime, org_id: str, before_id: int | None, limit: int) -> list[asyncpg.Record]:
    """The org's ledger entries, newest first: at most `limit` of them, all older than the entry
    `before_id` when given (a page's cursor)."""
    rows: list[asyncpg.Record] = await rt.pg.fetch(
        """
        SELECT id, kind, amount_pence, debt_delta_pence, balance_after_pence, call_id, idempotency_key, created_at
        FROM ledger_entries
        WHERE org_id = $1 AND ($2::bigint IS NULL OR id < $2)
        ORDER BY id DESC LIMIT $3
        """,
        org_id,
        before_id,
        limit,
    )
    return rows
