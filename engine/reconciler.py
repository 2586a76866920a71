"""Reconciler: does Redis agree with Postgres, and if not, make it.

Check, per org, while the system runs. What Redis should hold is what Postgres holds, plus
what is still on its way there, minus what is still on its way to Redis:

    balance = projection + outbox entries the ledger lacks - credits Redis has not applied
    debt    = projection + outbox entries the ledger lacks
    holds   = live holds in call_holds, with the outbox's hold events applied in order
    settings (rate, overdraft, ...) = the orgs row
    call resolutions (Redis's idempotency records) = call_holds, with the outbox's applied
    rent: every paid month has its rent entry (engine/reconcile_records.py)

To compare one instant, Postgres is read before and after an atomic Redis read of each org
(lua/org_read.lua); an org whose Postgres state moved in between is read again (bounded), and
reported as busy if it never holds still. Nothing is judged from a torn read.

Repair, per drifted org: drain its outbox, then rewrite it from a Postgres snapshot with
org_restore.lua in 'seq' mode, which refuses if any decision happened since the snapshot began
(and then the repair tries again). Postgres is the truth: a balance Redis got wrong, in either
direction, becomes Postgres's.
"""

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from credit_engine.engine import limits
from credit_engine.engine import org_setting_table as table
from credit_engine.engine.amounts import billed_seconds_from_ms, call_cost_pence
from credit_engine.engine.balances import peek_org
from credit_engine.engine.credits import apply_pending_credits
from credit_engine.engine.idempotency import call_state_prefix
from credit_engine.engine.ledger import HoldEvent, LedgerEntry
from credit_engine.engine.outbox import MALFORMED_ERRORS, OutboxItem, drain_org_fully, parse_entry
from credit_engine.engine.reconcile_records import (
    Resolution,
    call_record_problems,
    ledger_keys_in,
    paid_months,
    postgres_resolutions,
    postgres_resolutions_of,
    redis_resolutions,
    rent_problems,
)
from credit_engine.engine.records import HoldRecord
from credit_engine.engine.restore import restore_orgs, snapshot_orgs
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.snapshots import LIVE_HOLDS_SQL, ORGS_SQL, org_id_pages, settings_from_row

Progress = Callable[[int, int, int], None]  # done, total, drifted

PENDING_SQL = """
SELECT org_id, idempotency_key, amount_pence, (extract(epoch FROM created_at) * 1000)::bigint AS created_ms
FROM pending_credits WHERE org_id = ANY($1::text[])
"""
SETTING_FIELDS = table.SCRIPT_ORDER  # the settings the org's Redis hash holds
MONEY_FIELDS = (
    "balance_pence",
    "held_pence",
    "debt_pence",
    "seq",
    "burn_rate",
    "burn_k",
    "burn_at_s",
    "burn_frozen_pence",
)
recheck_pause_s = 0.05
records_scan_count = 1_000  # call-resolution records per HSCAN round trip
# Longer than these, something is stuck (the worker drains within a second and re-applies
# credits every few seconds): it is reported, not treated as "still on its way".
outbox_stuck_ms = 5 * 60 * 1000
pending_credit_stuck_ms = 5 * 60 * 1000


@dataclass(frozen=True)
class PgState:
    settings: tuple[int, ...]
    balance_pence: int
    debt_pence: int
    last_entry_id: int | None
    live_holds: tuple[tuple[str, int, int], ...]  # (call_id, hold_pence, version)
    pending_credits: tuple[tuple[str, int, int], ...]  # (idempotency_key, amount_pence, created_ms)
    resolutions: tuple[Resolution, ...]  # calls resolved inside the idempotency window
    paid_months: tuple[tuple[str, str], ...]  # (number, month): rent_paid_month of the org's numbers


@dataclass(frozen=True)
class RedisState:
    present: bool
    money: dict[str, int]
    settings: tuple[int, ...]
    holds: dict[str, HoldRecord]
    outbox: list[OutboxItem]
    pending_applied: dict[str, bool]
    dead_letters: int
    resolutions: dict[str, Resolution]  # the call-resolution records, by call id
    unreadable: list[str]  # outbox entries that cannot be parsed


@dataclass
class OrgDrift:
    org_id: str
    problems: list[str]


@dataclass
class CheckReport:
    orgs_checked: int = 0
    drifted: list[OrgDrift] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # never held still long enough to compare
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.drifted and not self.busy


async def _pg_states(rt: Runtime, org_ids: list[str], window_from_ms: int) -> dict[str, PgState]:
    async with rt.pg.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        orgs = await conn.fetch(ORGS_SQL, org_ids)
        holds = await conn.fetch(LIVE_HOLDS_SQL, org_ids)
        pending = await conn.fetch(PENDING_SQL, org_ids)
        resolved = await postgres_resolutions(conn, org_ids, window_from_ms)
        paid = await paid_months(conn, org_ids)
    holds_by_org: dict[str, list[tuple[str, int, int]]] = {}
    for row in holds:
        holds_by_org.setdefault(row["org_id"], []).append((row["call_id"], row["hold_pence"], row["version"]))
    pending_by_org: dict[str, list[tuple[str, int, int]]] = {}
    for row in pending:
        pending_by_org.setdefault(row["org_id"], []).append(
            (row["idempotency_key"], row["amount_pence"], row["created_ms"])
        )
    return {
        row["org_id"]: PgState(
            settings=tuple(settings_from_row(row).script_args()),
            balance_pence=row["balance_pence"],
            debt_pence=row["debt_pence"],
            last_entry_id=row["last_entry_id"],
            live_holds=tuple(sorted(holds_by_org.get(row["org_id"], []))),
            pending_credits=tuple(sorted(pending_by_org.get(row["org_id"], []))),
            resolutions=tuple(sorted(resolved[row["org_id"]].values(), key=lambda r: r.call_id)),
            paid_months=tuple(sorted(paid.get(row["org_id"], []))),
        )
        for row in orgs
    }


async def _redis_states(rt: Runtime, pg: dict[str, PgState]) -> dict[str, RedisState]:
    """Each org read at one instant of its own (lua/org_read.lua): orgs are compared one by one,
    so no instant common to the page is needed, and a Redis Cluster can serve the page."""
    org_ids = list(pg)
    fields = [*MONEY_FIELDS, *SETTING_FIELDS]

    def build(pipe: Any) -> None:
        for org_id in org_ids:
            keys = rt.keys.org(org_id)
            pending_keys = [key for key, _, _ in pg[org_id].pending_credits]
            args = [len(fields), *fields, *pending_keys]
            rt.scripts.add_to_pipeline(
                pipe, "org_read", [keys.org, keys.holds, keys.outbox, keys.dead, keys.idem], args
            )

    replies = await rt.scripts.execute(rt.redis, build)
    states = {}
    for org_id, reply in zip(org_ids, replies, strict=True):
        _, values, holds_flat, outbox, dead_letters, pending = reply
        pending_keys = [key for key, _, _ in pg[org_id].pending_credits]
        holds = dict(zip(holds_flat[::2], holds_flat[1::2], strict=True))
        items, unreadable = _parse_outbox(outbox)
        states[org_id] = RedisState(
            present=values[0] is not None,
            money={name: int(v or 0) for name, v in zip(MONEY_FIELDS, values[: len(MONEY_FIELDS)], strict=True)},
            settings=tuple(int(v or 0) for v in values[len(MONEY_FIELDS) :]),
            holds={call_id: HoldRecord.decode(text) for call_id, text in holds.items()},
            outbox=items,
            pending_applied={key: value is not None for key, value in zip(pending_keys, pending, strict=True)},
            dead_letters=dead_letters,
            resolutions={},
            unreadable=unreadable,
        )
    return states


async def _add_resolutions(rt: Runtime, states: dict[str, RedisState]) -> dict[str, list[OutboxItem]]:
    """Each org's call-resolution records, by HSCAN (not in org_read.lua: a busy org has a week of
    them, which one script would read while every other client waited). Not atomic with the
    rest, so the outbox is read again afterwards: a resolution decided during the scan has its
    event in the second read (or, drained meanwhile, moves Postgres and the org is read again).
    Returns the second reads."""
    later: dict[str, list[OutboxItem]] = {}
    for org_id, state in states.items():
        flat: list[str] = []
        async for name, value in rt.redis.hscan_iter(
            rt.keys.org(org_id).idem, match=f"{call_state_prefix(org_id)}*", count=records_scan_count
        ):
            flat += [name, value]
        state.resolutions.update(redis_resolutions(org_id, flat))
        entries = await rt.redis.xrange(rt.keys.org(org_id).outbox, "-", "+")
        later[org_id] = _parse_outbox(entries)[0]
    return later


def _parse_outbox(entries: list[Any]) -> tuple[list[OutboxItem], list[str]]:
    """Stream entries as a script returns them (flat field lists) or redis-py does (dicts)."""
    items, unreadable = [], []
    for stream_id, fields in entries:
        try:
            if not isinstance(fields, dict):
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            items.append(parse_entry(stream_id, fields))
        except MALFORMED_ERRORS:
            unreadable.append(stream_id)
    return items, unreadable


async def _keys_in_ledger(rt: Runtime, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    rows = await rt.pg.fetch("SELECT idempotency_key FROM ledger_entries WHERE idempotency_key = ANY($1::text[])", keys)
    return {row["idempotency_key"] for row in rows}


def burn_sums(holds: Iterable[HoldRecord], burn_at_s: int) -> tuple[int, int, int]:
    """(burn_rate, burn_k, burn_frozen_pence) as lua/_burn.lua and lua/_holds.lua keep them, recomputed from the holds."""
    rate = k = frozen = 0
    for h in holds:
        if h.ended_ms > 0:
            if h.started_ms > 0 and h.ended_ms > h.started_ms:
                frozen += call_cost_pence(billed_seconds_from_ms(h.ended_ms - h.started_ms), h.rate_pence_per_minute)
        else:
            from_s = (h.started_ms if h.started_ms > 0 else h.created_ms) // 1000
            rate += h.rate_pence_per_minute
            k += h.rate_pence_per_minute * (burn_at_s - from_s)
    return rate, k, frozen


def compare(
    pg: PgState,
    redis: RedisState,
    in_ledger: set[str],
    now_ms: int,
    idempotency_ttl_ms: int,
    older_resolutions: dict[str, Resolution],
    outbox_later: list[OutboxItem],
) -> list[str]:
    """Problems found for one org (empty: Redis agrees with Postgres)."""
    if not redis.present:
        return ["missing in redis"]
    problems = []
    if redis.unreadable:
        problems.append(f"{len(redis.unreadable)} outbox entries cannot be read: {redis.unreadable[:3]}")
    if redis.dead_letters:
        problems.append(
            f"{redis.dead_letters} outbox entries were refused by the ledger (dead letters): Redis has "
            "changes Postgres does not"
        )
    if redis.outbox and now_ms - redis.outbox[0].created_ms > outbox_stuck_ms:
        problems.append(
            f"outbox not draining: its oldest entry is {(now_ms - redis.outbox[0].created_ms) // 1000} s old"
        )
    balance, debt = pg.balance_pence, pg.debt_pence
    holds = {call_id: hold_pence for call_id, hold_pence, _ in pg.live_holds}
    for item in redis.outbox:
        if isinstance(item, LedgerEntry):
            if item.idempotency_key not in in_ledger:
                balance += item.amount_pence
                debt += item.debt_delta_pence
        elif not isinstance(item, HoldEvent):
            continue  # an alert: no money
        elif item.status == "live":
            holds[item.call_id] = item.hold.hold_pence
        else:
            holds.pop(item.call_id, None)
    for key, amount_pence, created_ms in pg.pending_credits:
        if not redis.pending_applied.get(key, False):
            balance -= amount_pence
            if now_ms - created_ms > pending_credit_stuck_ms:
                problems.append(
                    f"credit {key} was committed {(now_ms - created_ms) // 1000} s ago and is still not in Redis"
                )
    if redis.money["balance_pence"] != balance:
        problems.append(f"balance_pence: redis {redis.money['balance_pence']}, postgres says {balance}")
    if redis.money["debt_pence"] != debt:
        problems.append(f"debt_pence: redis {redis.money['debt_pence']}, postgres says {debt}")
    redis_holds = {call_id: hold.hold_pence for call_id, hold in redis.holds.items()}
    if redis_holds != holds:
        problems.append(f"live holds: redis {sorted(redis_holds.items())}, postgres says {sorted(holds.items())}")
    if redis.money["held_pence"] != sum(redis_holds.values()):
        problems.append(f"held_pence {redis.money['held_pence']} is not the sum of redis's live holds")
    expected_burn = burn_sums(redis.holds.values(), redis.money["burn_at_s"])
    actual_burn = (redis.money["burn_rate"], redis.money["burn_k"], redis.money["burn_frozen_pence"])
    if actual_burn != expected_burn:
        problems.append(
            f"kill-switch burn sums (rate, k, frozen) {actual_burn} disagree with the live holds: {expected_burn}"
        )
    if redis.settings != pg.settings:
        problems.append(f"settings: redis {redis.settings}, postgres says {pg.settings}")
    problems += call_record_problems(
        redis.resolutions,
        {**older_resolutions, **{r.call_id: r for r in pg.resolutions}},
        [*redis.outbox, *outbox_later],
        redis.holds,
        now_ms,
        idempotency_ttl_ms,
    )
    return problems


async def _check_orgs(rt: Runtime, org_ids: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Compare a page of orgs. Returns (problems by org, orgs that changed while being read)."""
    now_ms = await rt.clock.now_ms(rt.redis)
    window_from_ms = now_ms - rt.settings.idempotency_ttl_ms
    before = await _pg_states(rt, org_ids, window_from_ms)
    redis = await _redis_states(rt, before)
    outbox_later = await _add_resolutions(rt, redis)
    older = await _older_resolutions(rt, before, redis)
    outbox_keys = {key for state in redis.values() for key in ledger_keys_in(state.outbox)}
    in_ledger = await _keys_in_ledger(rt, sorted(outbox_keys))
    after = await _pg_states(rt, list(before), window_from_ms)
    rent = await rent_problems(
        rt.pg,
        {org_id: list(state.paid_months) for org_id, state in before.items()},
        outbox_keys | {key for items in outbox_later.values() for key in ledger_keys_in(items)},
    )
    problems: dict[str, list[str]] = {}
    moved = []
    for org_id, pg_state in before.items():
        if after.get(org_id) != pg_state:
            moved.append(org_id)
            continue
        found = compare(
            pg_state,
            redis[org_id],
            in_ledger,
            now_ms,
            rt.settings.idempotency_ttl_ms,
            older.get(org_id, {}),
            outbox_later[org_id],
        )
        found += rent.get(org_id, [])
        if found:
            problems[org_id] = found
    return problems, moved


async def _older_resolutions(
    rt: Runtime, pg: dict[str, PgState], redis: dict[str, RedisState]
) -> dict[str, dict[str, Resolution]]:
    """Redis keeps a record past its window until a script prunes it: the rows of those (older than
    the window's query read), to compare them too."""
    wanted = []
    for org_id, state in redis.items():
        in_window = {r.call_id for r in pg[org_id].resolutions}
        wanted += [(org_id, call_id) for call_id in state.resolutions if call_id not in in_window]
    older: dict[str, dict[str, Resolution]] = {}
    for (org_id, call_id), resolution in (await postgres_resolutions_of(rt.pg, wanted)).items():
        older.setdefault(org_id, {})[call_id] = resolution
    return older


async def check(rt: Runtime, org_ids: list[str] | None = None, progress: Progress | None = None) -> CheckReport:
    report = CheckReport()
    started = time.monotonic()
    async with rt.pg.acquire() as conn:
        pages = [page async for page in org_id_pages(conn, limits.reconcile_page_size, only=org_ids)]
    total = sum(len(page) for page in pages)
    for page in pages:
        problems, moved = await _check_orgs(rt, page)
        for _ in range(limits.reconcile_check_attempts_max):
            if not moved:
                break
            await asyncio.sleep(recheck_pause_s)
            more_problems, moved = await _check_orgs(rt, moved)
            problems.update(more_problems)
        report.busy.extend(moved)
        report.drifted.extend(OrgDrift(org_id, found) for org_id, found in sorted(problems.items()))
        report.orgs_checked += len(page)
        if progress is not None:
            progress(report.orgs_checked, total, len(report.drifted))
    report.seconds = time.monotonic() - started
    return report


@dataclass
class RepairReport:
    credits_applied: int = 0  # credits committed in Postgres that Redis had not applied yet
    repaired: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    after: CheckReport = field(default_factory=CheckReport)


async def repair_org(rt: Runtime, org_id: str) -> Outcome:
    """Rewrite one org in Redis from Postgres, refusing to overwrite any decision made meanwhile."""
    for _ in range(limits.reconcile_check_attempts_max):
        await drain_org_fully(rt, org_id)
        code, _, _, _, _, seq, outbox_length = await peek_org(rt, org_id)
        if outbox_length:
            continue
        snapshot = (await snapshot_orgs(rt, [org_id]))[org_id]
        mode = "absent" if code == Outcome.org_unknown else "seq"
        outcome = (await restore_orgs(rt, [snapshot], mode, expected_seq=seq))[org_id]
        if outcome == Outcome.ok:
            # The restored balance includes every credit Postgres had, and their idempotency
            # records came with it: those credits are applied now.
            await rt.pg.execute(
                "DELETE FROM pending_credits WHERE idempotency_key = ANY($1::text[])",
                list(snapshot.pending_credit_keys),
            )
            await archive_dead_letters(rt, org_id)
            return outcome
        await asyncio.sleep(recheck_pause_s)
    return Outcome.restore_conflict


async def archive_dead_letters(rt: Runtime, org_id: str) -> int:
    """After a repair has made Redis agree with Postgres, the refused entries have served their
    purpose in Redis: keep them in ledger_rejects (Postgres) and clear them from Redis."""
    keys = rt.keys.org(org_id)
    entries = await rt.redis.xrange(keys.dead, "-", "+")
    if not entries:
        return 0
    await rt.pg.executemany(
        "INSERT INTO ledger_rejects (org_id, idempotency_key, reason, entry) VALUES ($1, $2, $3, $4)",
        [
            (org_id, fields.get("k", ""), "dead_letter: " + fields.get("reason", ""), orjson.dumps(fields).decode())
            for _, fields in entries
        ],
    )
    await rt.redis.xdel(keys.dead, *[stream_id for stream_id, _ in entries])
    return len(entries)


async def repair(rt: Runtime, org_ids: list[str] | None = None, progress: Progress | None = None) -> RepairReport:
    report = RepairReport()
    # Credits still on their way to Redis are not drift, but repair finishes them.
    for _ in range(limits.reconcile_check_attempts_max):
        applied = (await apply_pending_credits(rt, older_than_ms=0, org_ids=org_ids)).applied
        report.credits_applied += applied
        if applied == 0:
            break
    found = await check(rt, org_ids, progress)
    for drift in found.drifted:
        outcome = await repair_org(rt, drift.org_id)
        if outcome == Outcome.ok:
            report.repaired.append(drift.org_id)
        else:
            report.failed[drift.org_id] = "kept changing; try again"
    report.after = (
        await check(rt, [d.org_id for d in found.drifted] + found.busy)
        if found.drifted or found.busy
        else CheckReport()
    )
    return report
