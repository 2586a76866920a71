"""Monthly phone-number rent, charged by a worker cron.

A number pays its purchase price for the month it was bought in, then
CREDIT_ENGINE_PHONE_NUMBER_RENT_PENCE on the 1st (UTC, by Redis's clock) of every later month:
a zero-debt asset charge whose key names the number and the month, so each (number, month) is
charged at most once. Redis decides it like any charge; Postgres remembers it for good
(`phone_numbers.rent_paid_month`, and the ledger key, asked before charging), so a run after
Redis forgot the key does not charge again. The key lives in the internal namespace `rent`
(engine/idempotency.py), where no client's Idempotency-Key can reach: a month counts as paid only
by a rent entry for that number and that month.

A number whose rent cannot be paid: an alert (`rent_failed`, once a month); after
CREDIT_ENGINE_RENT_GRACE_DAYS into the month it is suspended (calls to it are refused; alert
`number_suspended`); after CREDIT_ENGINE_RENT_RELEASE_DAYS it is released at the provider
(alert `number_released`) and never charged again. A suspended number whose org has been topped
up is charged on the next run and works again (alert `number_reactivated`).
"""

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from credit_engine.engine.assets import charge_asset
from credit_engine.engine.idempotency import legacy_rent_ledger_key, rent_alert_key, rent_ledger_key
from credit_engine.engine.phone_numbers import forget_owner
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import ProviderError, Telephony

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
numbers_per_page = 1_000  # due numbers per query; a run pages through all of them
pages_per_run_max = 1_000  # 1,000,000 numbers a run; the next run (10 minutes later) goes on


@dataclass
class RentReport:
    month: str
    charged: int = 0
    already_paid: int = 0
    unpaid: int = 0
    suspended: int = 0
    released: int = 0
    reactivated: int = 0
    failed: list[str] = field(default_factory=list)


def month_of(now_ms: int) -> tuple[str, int]:
    """('YYYY-MM', the month's first millisecond), UTC."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    return f"{now.year:04d}-{now.month:02d}", int(start.timestamp() * 1000)


def month_start_ms(month: str) -> int:
    year, number = (int(part) for part in month.split("-"))
    return int(datetime(year, number, 1, tzinfo=UTC).timestamp() * 1000)


async def _alert(rt: Runtime, org_id: str, kind: str, number_id: str, month: str, now_ms: int, **extra: Any) -> None:
    payload = {
        "type": kind,
        "org_id": org_id,
        "phone_number_id": number_id,
        "month": month,
        "rent_pence": rt.settings.phone_number_rent_pence,
        **extra,
    }
    await rt.pg.execute(
        """INSERT INTO alert_events (org_id, idempotency_key, kind, payload, created_at)
           VALUES ($1, $2, $3, $4::jsonb, to_timestamp($5::bigint / 1000.0)) ON CONFLICT (idempotency_key) DO NOTHING""",
        org_id,
        rent_alert_key(org_id, kind, number_id, month),
        kind,
        payload,
        now_ms,  # the pool's codec encodes it
    )


# Suspend or release only a number still unpaid for the month (a top-up and a charge may have come in between).
UNPAID_UPDATE = (
    "UPDATE phone_numbers SET {set} WHERE vapi_phone_number_id = $1 "
    "AND (rent_paid_month IS NULL OR rent_paid_month < $2)"
)
RENT_LOCK = 0x72656E74  # pg advisory lock: one rent run at a time across every worker


async def charge_rent(rt: Runtime, telephony: Telephony, now_ms: int | None = None) -> RentReport:
    now_ms = now_ms if now_ms is not None else await rt.clock.now_ms(rt.redis)
    month, this_month_ms = month_of(now_ms)
    report = RentReport(month)
    async with rt.pg.acquire() as lock_conn:
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", RENT_LOCK):
            log.info("another worker is charging rent; skipping this run")
            return report
        try:
            await _charge_due(rt, telephony, report, month, this_month_ms, now_ms)
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock($1)", RENT_LOCK)
    return report


async def _charge_due(
    rt: Runtime, telephony: Telephony, report: RentReport, month: str, this_month_ms: int, now_ms: int
) -> None:
    # A web process may have cached a number just before it was suspended: forget them again.
    inactive = await rt.pg.fetch("SELECT vapi_phone_number_id FROM phone_numbers WHERE status <> 'active'")
    await forget_owner(rt, *[row["vapi_phone_number_id"] for row in inactive])
    # Keyset pages over every due number: a page full of numbers that cannot pay must not hide
    # the numbers after it (a fixed LIMIT did).
    after = ""
    for _ in range(pages_per_run_max):
        rows = await rt.pg.fetch(
            """SELECT vapi_phone_number_id, org_id, status, rent_paid_month, rent_failed_month FROM phone_numbers
               WHERE status IN ('active', 'suspended') AND created_at < to_timestamp($1::bigint / 1000.0)
                 AND (rent_paid_month IS NULL OR rent_paid_month < $2) AND vapi_phone_number_id > $3
               ORDER BY vapi_phone_number_id LIMIT $4""",
            this_month_ms,
            month,
            after,
            numbers_per_page,
        )
        for row in rows:
            number_id, org_id = row["vapi_phone_number_id"], row["org_id"]
            try:
                await _one_number(rt, telephony, report, row, number_id, org_id, month, now_ms)
            except Exception:  # one number's trouble (the provider, say) must not stop the others
                log.exception("rent for number %s of org %s failed; trying again next run", number_id, org_id)
                report.failed.append(number_id)
        if len(rows) < numbers_per_page:
            return
        after = rows[-1]["vapi_phone_number_id"]
    log.warning(
        "rent run stopped after %d pages of %d numbers; the next run goes on", pages_per_run_max, numbers_per_page
    )


async def month_paid(rt: Runtime, org_id: str, number_id: str, month: str) -> bool:
    """Whether the ledger holds this number's rent for this month: its rent entry, or one an earlier
    release kept under the client namespace, recognised by its meta (a purchase's meta says
    `phone_number`, so a purchase keyed like rent never counts)."""
    paid = await rt.pg.fetchval(
        """SELECT 1 FROM ledger_entries WHERE idempotency_key = $1
           OR (idempotency_key = $2 AND meta->>'asset' = 'phone_number_rent'
               AND meta->>'phone_number_id' = $3 AND meta->>'month' = $4)""",
        rent_ledger_key(org_id, number_id, month),
        legacy_rent_ledger_key(org_id, number_id, month),
        number_id,
        month,
    )
    return paid is not None


async def _one_number(
    rt: Runtime,
    telephony: Telephony,
    report: RentReport,
    row: Any,
    number_id: str,
    org_id: str,
    month: str,
    now_ms: int,
) -> None:
    if await month_paid(rt, org_id, number_id, month):
        outcome = Outcome.replayed
    else:
        key = rent_ledger_key(org_id, number_id, month)
        deduction = await charge_asset(
            rt,
            org_id,
            key,
            rt.settings.phone_number_rent_pence,
            meta={"asset": "phone_number_rent", "phone_number_id": number_id, "month": month},
        )
        outcome = deduction.outcome
    if outcome in (Outcome.ok, Outcome.replayed):
        await rt.pg.execute(
            """UPDATE phone_numbers SET rent_paid_month = $2, status = 'active', suspended_at = NULL
               WHERE vapi_phone_number_id = $1""",
            number_id,
            month,
        )
        report.charged += outcome == Outcome.ok
        report.already_paid += outcome == Outcome.replayed
        if row["status"] == "suspended":
            report.reactivated += 1
            await _alert(rt, org_id, "number_reactivated", number_id, month, now_ms)
            log.warning("number %s of org %s paid its rent for %s and works again", number_id, org_id, month)
        return
    if outcome != Outcome.insufficient_funds:
        report.failed.append(number_id)  # org unknown in Redis, outbox full: the next run tries again
        return
    report.unpaid += 1
    # The grace and release clocks run from the first unpaid month of this episode, so a new
    # month does not restart them.
    failed, paid = row["rent_failed_month"], row["rent_paid_month"]
    unpaid_since = failed if failed is not None and (paid is None or paid < failed) else None
    if unpaid_since is None:
        unpaid_since = month
        await rt.pg.execute(
            "UPDATE phone_numbers SET rent_failed_month = $2 WHERE vapi_phone_number_id = $1", number_id, month
        )
        await _alert(
            rt,
            org_id,
            "rent_failed",
            number_id,
            month,
            now_ms,
            suspend_after_days=rt.settings.rent_grace_days,
            release_after_days=rt.settings.rent_release_days,
        )
    days_overdue = (now_ms - month_start_ms(unpaid_since)) / DAY_MS
    if days_overdue >= rt.settings.rent_release_days:
        try:
            await telephony.release(number_id)
        except ProviderError as error:
            log.error(
                "could not release unpaid number %s of org %s at %s: %s", number_id, org_id, telephony.name, error
            )
            report.failed.append(number_id)
            return
        await rt.pg.execute(UNPAID_UPDATE.format(set="status = 'released', released_at = now()"), number_id, month)
        await forget_owner(rt, number_id)
        await _alert(rt, org_id, "number_released", number_id, month, now_ms)
        log.warning(
            "released number %s of org %s: rent for %s unpaid for %.0f days", number_id, org_id, month, days_overdue
        )
        report.released += 1
    elif days_overdue >= rt.settings.rent_grace_days and row["status"] == "active":
        await rt.pg.execute(UNPAID_UPDATE.format(set="status = 'suspended', suspended_at = now()"), number_id, month)
        await forget_owner(rt, number_id)
        await _alert(
            rt, org_id, "number_suspended", number_id, month, now_ms, release_after_days=rt.settings.rent_release_days
        )
        log.warning(
            "suspended number %s of org %s: rent for %s unpaid for %.0f days", number_id, org_id, month, days_overdue
        )
        report.suspended += 1
