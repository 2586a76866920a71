"""An org's state as Postgres knows it: what the reconciler writes into Redis.

For each org: its settings, its projection (balance, debt), its live holds, and the idempotency
records Redis needs to refuse replays: recent credits and asset deductions, credits not yet
confirmed as applied in Redis (whatever their age), and recently resolved calls.
"""

from dataclasses import dataclass

import asyncpg

from credit_engine.engine import org_setting_table as table
from credit_engine.engine.idempotency import call_state_key
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.records import CallState, HoldRecord, asset_idem_value, credit_idem_value
from credit_engine.engine.timeutil import dt_from_ms, ms_from_dt
from credit_engine.engine.types import HoldStatus


@dataclass(frozen=True)
class IdemRecord:
    field: str
    value: str
    expires_ms: int


@dataclass(frozen=True)
class OrgSnapshot:
    org_id: str
    name: str
    settings: OrgSettings
    balance_pence: int
    debt_pence: int
    last_entry_id: int | None
    live_holds: dict[str, HoldRecord]
    idem: list[IdemRecord]
    pending_credit_keys: frozenset[str]  # credits Redis has not confirmed yet (their records are in idem)

    @property
    def held_pence(self) -> int:
        return sum(hold.hold_pence for hold in self.live_holds.values())


ORGS_SQL = f"""
SELECT o.org_id, o.name, {", ".join(f"o.{name}" for name in table.NAMES)},
       b.balance_pence, b.debt_pence, b.last_entry_id
FROM orgs o JOIN org_balances b USING (org_id)
WHERE o.org_id = ANY($1::text[])
"""

LIVE_HOLDS_SQL = """
SELECT org_id, call_id, hold_pence, rate_pence_per_minute, created_at, started_at, last_seen_at,
       expires_at, max_duration_seconds, version, ended_at
FROM call_holds
WHERE org_id = ANY($1::text[]) AND status = 'live'
"""

IDEM_ENTRIES_SQL = """
SELECT org_id, idempotency_key, kind, amount_pence, meta, created_at
FROM ledger_entries
WHERE org_id = ANY($1::text[]) AND kind IN ('topup', 'refund', 'asset') AND created_at >= $2
UNION
SELECT l.org_id, l.idempotency_key, l.kind, l.amount_pence, l.meta, l.created_at
FROM pending_credits p JOIN ledger_entries l USING (idempotency_key)
WHERE p.org_id = ANY($1::text[])
"""

PENDING_KEYS_SQL = "SELECT org_id, idempotency_key FROM pending_credits WHERE org_id = ANY($1::text[])"

RESOLVED_CALLS_SQL = """
SELECT org_id, call_id, status, charged_pence, billed_seconds, rate_pence_per_minute, resolved_at
FROM call_holds
WHERE org_id = ANY($1::text[]) AND status <> 'live' AND resolved_at >= $2
"""


def settings_from_row(row: asyncpg.Record) -> OrgSettings:
    return OrgSettings(**{name: row[name] for name in table.NAMES})


def hold_from_row(row: asyncpg.Record) -> HoldRecord:
    return HoldRecord(
        hold_pence=row["hold_pence"],
        rate_pence_per_minute=row["rate_pence_per_minute"],
        created_ms=ms_from_dt(row["created_at"]),
        started_ms=ms_from_dt(row["started_at"]) if row["started_at"] is not None else 0,
        last_seen_ms=ms_from_dt(row["last_seen_at"]),
        expires_ms=ms_from_dt(row["expires_at"]),
        max_duration_s=row["max_duration_seconds"],
        version=row["version"],
        ended_ms=ms_from_dt(row["ended_at"]) if row["ended_at"] is not None else 0,
    )


def _idem_from_entry(row: asyncpg.Record, ttl_ms: int) -> IdemRecord:
    expires_ms = ms_from_dt(row["created_at"]) + ttl_ms
    if row["kind"] == "asset":
        redis_meta = row["meta"].get("redis", {})
        value = asset_idem_value(
            -row["amount_pence"], row["meta"].get("fingerprint", ""), redis_meta.get("balance_after_pence", 0)
        )
    else:
        value = credit_idem_value(row["amount_pence"])
    return IdemRecord(row["idempotency_key"], value, expires_ms)


def _idem_from_resolved_call(row: asyncpg.Record, ttl_ms: int) -> IdemRecord:
    state = CallState(
        status=HoldStatus(row["status"]),
        charged_pence=row["charged_pence"] or 0,
        billed_seconds=row["billed_seconds"] or 0,
        rate_pence_per_minute=row["rate_pence_per_minute"],
    )
    expires_ms = ms_from_dt(row["resolved_at"]) + ttl_ms
    return IdemRecord(call_state_key(row["org_id"], row["call_id"]), state.encode(), expires_ms)


async def load_snapshots(
    conn: asyncpg.Connection, org_ids: list[str], now_ms: int, idempotency_ttl_ms: int
) -> dict[str, OrgSnapshot]:
    since = dt_from_ms(now_ms - idempotency_ttl_ms)
    org_rows = await conn.fetch(ORGS_SQL, org_ids)
    holds: dict[str, dict[str, HoldRecord]] = {org_id: {} for org_id in org_ids}
    for row in await conn.fetch(LIVE_HOLDS_SQL, org_ids):
        holds[row["org_id"]][row["call_id"]] = hold_from_row(row)
    idem: dict[str, list[IdemRecord]] = {org_id: [] for org_id in org_ids}
    for row in await conn.fetch(IDEM_ENTRIES_SQL, org_ids, since):
        idem[row["org_id"]].append(_idem_from_entry(row, idempotency_ttl_ms))
    for row in await conn.fetch(RESOLVED_CALLS_SQL, org_ids, since):
        idem[row["org_id"]].append(_idem_from_resolved_call(row, idempotency_ttl_ms))
    pending: dict[str, set[str]] = {org_id: set() for org_id in org_ids}
    for row in await conn.fetch(PENDING_KEYS_SQL, org_ids):
        pending[row["org_id"]].add(row["idempotency_key"])
    return {
        row["org_id"]: OrgSnapshot(
            org_id=row["org_id"],
            name=row["name"],
            settings=settings_from_row(row),
            balance_pence=row["balance_pence"],
            debt_pence=row["debt_pence"],
            last_entry_id=row["last_entry_id"],
            live_holds=holds[row["org_id"]],
            idem=idem[row["org_id"]],
            pending_credit_keys=frozenset(pending[row["org_id"]]),
        )
        for row in org_rows
    }


async def org_id_pages(conn: asyncpg.Connection, page_size: int, only: list[str] | None = None):  # type: ignore[no-untyped-def]
    """All org ids in pages (keyset pagination), or just `only` in pages."""
    if only is not None:
        for start in range(0, len(only), page_size):
            yield only[start : start + page_size]
        return
    after = ""
    while True:  # ends when a page comes back empty; each page moves `after` strictly forward
        rows = await conn.fetch("SELECT org_id FROM orgs WHERE org_id > $1 ORDER BY org_id LIMIT $2", after, page_size)
        if not rows:
            return
        page = [row["org_id"] for row in rows]
        yield page
        after = page[-1]
