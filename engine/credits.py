"""Credits (top-ups, refunds): Postgres-first, so money a customer paid is never only in Redis.

1. One Postgres transaction: the ledger entry (idempotent by key), the projection, and a
   pending_credits row saying "Redis has not confirmed this yet".
2. credit_apply.lua applies it to Redis, idempotently by the same key (and pays off debt first,
   as a Redis-first debt_repayment entry through the outbox).
3. The pending row is deleted. If step 2 or 3 fails (Redis down, a crash), the worker's
   `apply_pending_credits` finishes the job; applying twice is a replay, never a double credit.
"""

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine import limits, validate
from credit_engine.engine.balances import money_now, projected_balance_pence
from credit_engine.engine.decisions import decide, restoring
from credit_engine.engine.errors import InvalidInput, OrgNotFound
from credit_engine.engine.idempotency import credit_ledger_key, repay_ledger_key
from credit_engine.engine.ledger import write_credit
from credit_engine.engine.results import Money, Outcome, ScriptResult
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.types import CREDIT_KINDS, EntryKind

log = logging.getLogger(__name__)

# A pending credit older than this is not re-applied automatically: Redis may have pruned its
# idempotency record, so applying again could credit twice. `reconcile --repair` settles it.
pending_credit_auto_apply_age_fraction_max = 0.5


@dataclass(frozen=True)
class Credit:
    outcome: Outcome  # ok, replayed, idempotency_conflict
    ledger_key: str
    entry_id: int
    amount_pence: int
    applied: bool  # Redis has applied it (now or earlier)
    money: Money | None  # the org in Redis after applying; None when not applied now (not yet, or long ago)


async def credit(
    rt: Runtime,
    org_id: str,
    idempotency_key: str,
    amount_pence: int,
    *,
    kind: EntryKind = EntryKind.topup,
    meta: dict[str, Any] | None = None,
) -> Credit:
    assert kind in CREDIT_KINDS
    validate.org_id(org_id)
    validate.amount_pence(amount_pence)
    key = credit_ledger_key(org_id, kind.value, idempotency_key)
    async with rt.pg.acquire() as conn, conn.transaction():
        projection = await conn.fetchrow(
            "SELECT balance_pence, debt_pence FROM org_balances WHERE org_id = $1 FOR UPDATE", org_id
        )
        if projection is None:
            raise OrgNotFound(org_id)
        existing = await conn.fetchrow(
            """SELECT l.id, l.amount_pence, p.idempotency_key IS NOT NULL AS pending,
                      (extract(epoch FROM now() - p.created_at) * 1000)::bigint AS pending_age_ms
               FROM ledger_entries l LEFT JOIN pending_credits p USING (idempotency_key)
               WHERE l.idempotency_key = $1""",
            key,
        )
        if existing is not None:
            if existing["amount_pence"] != amount_pence:
                return Credit(Outcome.idempotency_conflict, key, existing["id"], existing["amount_pence"], False, None)
            outcome = Outcome.replayed
            entry_id = existing["id"]
            # Redis confirmed this credit already when its pending row is gone. Applying it again
            # would credit twice once Redis has forgotten its idempotency record
            # (CREDIT_ENGINE_IDEMPOTENCY_TTL_S): such a replay is answered from the ledger alone.
            confirmed = not existing["pending"]
            if existing["pending"] and existing["pending_age_ms"] > _too_old_ms(rt):
                # Unconfirmed for so long that Redis may have pruned the record: not by key alone
                # (the worker repairs the org from Postgres, whose balance includes it).
                age_s = existing["pending_age_ms"] // 1000
                log.error("replay of credit %s: still pending after %d s; left to the worker's repair", key, age_s)
                return Credit(outcome, key, entry_id, amount_pence, False, None)
        else:
            balance_pence_after = projection["balance_pence"] + amount_pence
            if balance_pence_after > limits.balance_pence_max:
                raise InvalidInput("amount_pence", f"would take the balance above {limits.balance_pence_max} pence")
            entry_id = await write_credit(
                conn, org_id, key, kind, amount_pence, balance_pence_after, projection["debt_pence"], meta
            )
            await conn.execute(
                "INSERT INTO pending_credits (idempotency_key, org_id, amount_pence) VALUES ($1, $2, $3)",
                key,
                org_id,
                amount_pence,
            )
            outcome = Outcome.ok
            confirmed = False
    if confirmed:
        return Credit(outcome, key, entry_id, amount_pence, True, await money_now(rt, org_id))
    applied, money = await apply_to_redis(rt, org_id, key, amount_pence)
    return Credit(outcome, key, entry_id, amount_pence, applied, money)


async def apply_to_redis(rt: Runtime, org_id: str, key: str, amount_pence: int) -> tuple[bool, Money | None]:
    """Apply a committed credit to Redis and clear its pending row. Never raises for Redis trouble:
    the credit is safe in Postgres and the worker will apply it later."""
    try:
        # Redis does not have the org: restoring it from Postgres includes this credit (the retry replays).
        result = await restoring(rt, org_id, lambda: _run_credit_apply(rt, org_id, key, amount_pence))
    except RedisError as error:
        log.warning(
            "credit %s committed in postgres, not yet applied in redis (%s); the worker will apply it", key, error
        )
        return False, None
    if result.outcome not in (Outcome.ok, Outcome.replayed):
        log.error("credit %s could not be applied in redis: %s", key, result.outcome.name)
        return False, None
    await rt.pg.execute("DELETE FROM pending_credits WHERE idempotency_key = $1", key)
    return True, result.money


async def _run_credit_apply(rt: Runtime, org_id: str, key: str, amount_pence: int) -> ScriptResult:
    keys = rt.keys.org(org_id)
    repay_key = repay_ledger_key(org_id, key)
    return await decide(
        rt,
        "credit_apply",
        org_id,
        [keys.org, keys.idem, keys.idem_exp, keys.outbox],
        [rt.clock.script_arg(), org_id, key, amount_pence, repay_key, rt.settings.idempotency_ttl_ms],
        tail_length=1,
        operation="credit",
    )


def _too_old_ms(rt: Runtime) -> int:
    return int(rt.settings.idempotency_ttl_ms * pending_credit_auto_apply_age_fraction_max)


@dataclass
class PendingReport:
    applied: int = 0
    failed: int = 0
    too_old: int = 0
    too_old_orgs: set[str] = field(default_factory=set)  # for the reconciler's repair


async def apply_pending_credits(
    rt: Runtime, *, older_than_ms: int = 2_000, limit: int = 500, org_ids: list[str] | None = None
) -> PendingReport:
    """Finish credits whose Redis step did not complete. Run by the worker's cron and by repair."""
    report = PendingReport()
    too_old_ms = _too_old_ms(rt)
    rows = await rt.pg.fetch(
        """
        SELECT idempotency_key, org_id, amount_pence,
               (extract(epoch FROM now() - created_at) * 1000)::bigint AS age_ms
        FROM pending_credits
        WHERE created_at <= now() - make_interval(secs => $1::double precision / 1000)
          AND ($3::text[] IS NULL OR org_id = ANY($3::text[]))
        ORDER BY created_at LIMIT $2
        """,
        older_than_ms,
        limit,
        org_ids,
    )
    for row in rows:
        if row["age_ms"] > too_old_ms:
            log.error(
                "pending credit %s is too old to apply by itself; its org must be repaired from postgres",
                row["idempotency_key"],
            )
            report.too_old += 1
            report.too_old_orgs.add(row["org_id"])
            continue
        await rt.pg.execute(
            "UPDATE pending_credits SET attempts = attempts + 1 WHERE idempotency_key = $1", row["idempotency_key"]
        )
        applied, _ = await apply_to_redis(rt, row["org_id"], row["idempotency_key"], row["amount_pence"])
        if applied:
            report.applied += 1
        else:
            report.failed += 1
    return report


TOP_UP = "topup"  # the claim's operation


@dataclass(frozen=True)
class TopUp:
    """A top-up's result, and the record its claim keeps."""

    outcome: Outcome  # ok, replayed (the ledger had the key), idempotency_conflict (another amount)
    transaction_id: int
    balance_pence: int | None  # Redis's after applying it, else Postgres's projection
    available_pence: int | None  # None while Redis has not applied it
    applied: bool

    def kept(self) -> bool:
        return self.outcome != Outcome.idempotency_conflict  # a refused key is not spent

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome.name}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TopUp":
        known = {name: record[name] for name in cls.__dataclass_fields__ if name in record}
        return cls(**{**known, "outcome": Outcome[record["outcome"]]})


async def top_up(
    rt: Runtime, org_id: str, idempotency_key: str, amount_pence: int, meta: dict[str, Any]
) -> claims.Once[TopUp]:
    """A client's top-up under its Idempotency-Key, once (engine/idempotent_requests.once)."""
    validate.amount_pence(amount_pence)  # refused before the key is claimed: a bad request spends no key

    async def run(attempt: claims.Attempt) -> TopUp:
        # attempt.changed stays False: if this raises, the claim is forgotten even after the
        # ledger entry was written, as the entry's own key makes a rerun a replay (the same
        # amount) or a conflict (another), never a second credit; a refusal (InvalidInput) spends
        # no key.
        result = await credit(rt, org_id, idempotency_key, amount_pence, meta=meta)
        balance: int | None
        available: int | None
        if result.money is not None:
            balance, available = result.money.balance_pence, result.money.available_pence
        else:  # committed in the ledger; Redis will apply it shortly (the worker, or a retry of this call)
            balance, available = await projected_balance_pence(rt, org_id), None
        return TopUp(result.outcome, result.entry_id, balance, available, result.applied)

    return await claims.once(
        rt, org_id, TOP_UP, idempotency_key, {"amount_pence": amount_pence}, run, TopUp.from_record
    )
