"""The reconciler's second comparison: the records that stop a second charge, besides the money.

Redis's call resolutions (each org's `idem` hash, `<org>/call/<call_id>` -> "status|charged|
billed|rate") decide whether a replayed report is a replay or a new charge: a record set back
from 'committed' to 'expired' lets a replayed report settle a call twice, and a record missing
inside the idempotency window lets it be billed again. Each is compared with Postgres's
`call_holds`, with the resolutions still in the outbox applied on top.

Rent: a number whose `rent_paid_month` says a month is paid must have that month's rent entry
in the ledger (or still in the outbox on its way there).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from credit_engine.engine.idempotency import call_state_prefix, legacy_rent_ledger_key, rent_ledger_key
from credit_engine.engine.ledger import HoldEvent, LedgerEntry
from credit_engine.engine.outbox import OutboxItem
from credit_engine.engine.records import CallState
from credit_engine.engine.timeutil import dt_from_ms
from credit_engine.engine.types import HoldStatus

# A resolution Postgres has and Redis lacks is drift only while Redis should still hold it: a
# record may be pruned once its window has passed, and the two clocks differ by a little.
window_margin_ms = 60_000

RESOLVED_SQL = """
SELECT org_id, call_id, status, charged_pence, billed_seconds, rate_pence_per_minute,
       (extract(epoch FROM resolved_at) * 1000)::bigint AS resolved_ms
FROM call_holds
WHERE org_id = ANY($1::text[]) AND status <> 'live' AND resolved_at >= $2
"""

RESOLVED_BY_ID_SQL = """
SELECT org_id, call_id, status, charged_pence, billed_seconds, rate_pence_per_minute,
       (extract(epoch FROM resolved_at) * 1000)::bigint AS resolved_ms
FROM call_holds h JOIN unnest($1::text[], $2::text[]) AS u(org_id, call_id) USING (org_id, call_id)
WHERE h.status <> 'live'
"""

PAID_NUMBERS_SQL = """
SELECT org_id, vapi_phone_number_id, rent_paid_month FROM phone_numbers
WHERE org_id = ANY($1::text[]) AND rent_paid_month IS NOT NULL
"""

RENT_ENTRIES_SQL = """
SELECT idempotency_key, meta->>'asset' AS asset, meta->>'phone_number_id' AS number_id, meta->>'month' AS month
FROM ledger_entries WHERE idempotency_key = ANY($1::text[])
"""


@dataclass(frozen=True)
class Resolution:
    """A call's resolution as one store has it."""

    call_id: str
    status: str
    charged_pence: int
    billed_seconds: int
    rate_pence_per_minute: int
    resolved_ms: int = 0

    def same(self, other: "Resolution") -> bool:
        return (self.status, self.charged_pence, self.billed_seconds, self.rate_pence_per_minute) == (
            other.status,
            other.charged_pence,
            other.billed_seconds,
            other.rate_pence_per_minute,
        )

    def text(self) -> str:
        return f"{self.status} {self.charged_pence}p for {self.billed_seconds} s at {self.rate_pence_per_minute}p/min"


def redis_resolutions(org_id: str, records: Sequence[str]) -> dict[str, Resolution]:
    """The flat (field, value) list org_read.lua returns, as resolutions by call id."""
    prefix = call_state_prefix(org_id)
    found = {}
    for field, value in zip(records[::2], records[1::2], strict=True):
        call_id = field.removeprefix(prefix)
        state = CallState.decode(value)
        found[call_id] = Resolution(
            call_id, state.status.value, state.charged_pence, state.billed_seconds, state.rate_pence_per_minute
        )
    return found


def _from_row(row: asyncpg.Record) -> Resolution:
    return Resolution(
        row["call_id"],
        row["status"],
        row["charged_pence"] or 0,
        row["billed_seconds"] or 0,
        row["rate_pence_per_minute"],
        row["resolved_ms"],
    )


async def postgres_resolutions(
    conn: asyncpg.Connection, org_ids: list[str], since_ms: int
) -> dict[str, dict[str, Resolution]]:
    """Each org's calls resolved since `since_ms`, by call id."""
    found: dict[str, dict[str, Resolution]] = {org_id: {} for org_id in org_ids}
    for row in await conn.fetch(RESOLVED_SQL, org_ids, dt_from_ms(since_ms)):
        found[row["org_id"]][row["call_id"]] = _from_row(row)
    return found


async def postgres_resolutions_of(
    rt_pg: asyncpg.Pool, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], Resolution]:
    """Older resolutions of given (org, call) pairs: Redis may keep a record past its window until
    a script prunes it."""
    if not wanted:
        return {}
    rows = await rt_pg.fetch(RESOLVED_BY_ID_SQL, [o for o, _ in wanted], [c for _, c in wanted])
    return {(row["org_id"], row["call_id"]): _from_row(row) for row in rows}


def in_flight_resolutions(outbox: Iterable[OutboxItem]) -> dict[str, Resolution]:
    """Resolutions still in the outbox (the last one per call), not yet in call_holds."""
    found = {}
    for item in outbox:
        if isinstance(item, HoldEvent) and item.status != HoldStatus.live:
            found[item.call_id] = Resolution(
                item.call_id,
                item.status.value,
                item.charged_pence,
                item.billed_seconds,
                item.hold.rate_pence_per_minute,
                item.created_ms,
            )
    return found


def call_record_problems(
    redis: dict[str, Resolution],
    postgres: dict[str, Resolution],
    outbox: Iterable[OutboxItem],
    live_call_ids: Iterable[str],
    now_ms: int,
    idempotency_ttl_ms: int,
) -> list[str]:
    """Where Redis's call resolutions disagree with Postgres's (the outbox applied on top). A
    resolution still in the outbox is not looked for among Redis's records: the records were
    scanned before the outbox was last read, so a call resolved in between has its event there
    and its record here only after the scan."""
    in_flight = in_flight_resolutions(outbox)
    expected = {**postgres, **in_flight}
    problems = []
    for call_id, record in sorted(redis.items()):
        truth = expected.get(call_id)
        if truth is None:
            problems.append(f"call {call_id}: redis records it {record.text()}, postgres has no resolution")
        elif not record.same(truth):
            problems.append(
                f"call {call_id}: redis records it {record.text()}, postgres says {truth.text()} "
                "(a replayed report would be settled against the wrong record)"
            )
    live = set(live_call_ids)
    keep_from_ms = now_ms - idempotency_ttl_ms + window_margin_ms
    for call_id, truth in sorted(postgres.items()):
        if (
            call_id not in redis
            and call_id not in live
            and call_id not in in_flight
            and truth.resolved_ms >= keep_from_ms
        ):
            problems.append(
                f"call {call_id}: postgres says {truth.text()}, redis has no record inside its "
                "idempotency window (a replayed report would be billed again)"
            )
    return problems


async def paid_months(conn: asyncpg.Connection, org_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Each org's numbers and the month their rent is paid to."""
    paid: dict[str, list[tuple[str, str]]] = {}
    for row in await conn.fetch(PAID_NUMBERS_SQL, org_ids):
        paid.setdefault(row["org_id"], []).append((row["vapi_phone_number_id"], row["rent_paid_month"]))
    return paid


async def rent_problems(
    pg: asyncpg.Pool, paid: dict[str, list[tuple[str, str]]], outbox_keys: set[str]
) -> dict[str, list[str]]:
    """Numbers whose paid month has no rent entry in the ledger (nor in the outbox)."""
    wanted = {
        (org_id, number_id, month): (
            rent_ledger_key(org_id, number_id, month),
            legacy_rent_ledger_key(org_id, number_id, month),
        )
        for org_id, numbers in paid.items()
        for number_id, month in numbers
    }
    if not wanted:
        return {}
    keys = [key for pair in wanted.values() for key in pair]
    entries = {row["idempotency_key"]: row for row in await pg.fetch(RENT_ENTRIES_SQL, keys)}
    problems: dict[str, list[str]] = {}
    for (org_id, number_id, month), (key, legacy) in sorted(wanted.items()):
        old = entries.get(legacy)
        legacy_paid = old is not None and (old["asset"], old["number_id"], old["month"]) == (
            "phone_number_rent",
            number_id,
            month,
        )
        if key in entries or key in outbox_keys or legacy_paid:
            continue
        problems.setdefault(org_id, []).append(
            f"number {number_id} is marked paid for {month}, but the ledger has no rent entry for it"
        )
    return problems


def ledger_keys_in(outbox: Iterable[OutboxItem]) -> set[str]:
    return {item.idempotency_key for item in outbox if isinstance(item, LedgerEntry)}
