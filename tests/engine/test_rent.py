"""Monthly phone-number rent, on real Redis and Postgres with a manual clock."""

from datetime import UTC, datetime

import pytest

from credit_engine.engine import rent
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.credits import credit
from credit_engine.engine.idempotency import rent_ledger_key
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.phone_numbers import Owner, number_owner, register_number
from credit_engine.engine.rent import charge_rent
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import FakeTelephony
from tests.helpers import new_org

DAY_MS = 86_400_000


def at(year: int, month: int, day: int, hour: int = 12) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


async def _number(rt: Runtime, org: str, number_id: str, bought: str = "2026-10-15") -> None:
    await register_number(
        rt,
        org,
        number_id,
        number="+15550004444",
        assistant_id="a",
        provider="fake",
        provision_key=None,
        status="active",
    )
    await rt.pg.execute(
        "UPDATE phone_numbers SET created_at = $2::date WHERE vapi_phone_number_id = $1",
        number_id,
        datetime.fromisoformat(bought).date(),
    )


async def _rent_rows(rt: Runtime, org: str) -> list[tuple[str, int]]:
    await drain_org_fully(rt, org)
    rows = await rt.pg.fetch(
        "SELECT idempotency_key, amount_pence FROM ledger_entries WHERE org_id = $1 AND kind = 'asset' ORDER BY id", org
    )
    return [(r["idempotency_key"], r["amount_pence"]) for r in rows]


async def _alerts(rt: Runtime, org: str) -> list[str]:
    return [r["kind"] for r in await rt.pg.fetch("SELECT kind FROM alert_events WHERE org_id = $1 ORDER BY id", org)]


async def test_rent_is_charged_once_per_number_and_month_even_after_redis_forgot(
    rt: Runtime, clock: ManualClock
) -> None:
    org = await new_org(rt, 10_000)
    await _number(rt, org, "pn-paid", bought="2026-10-15")
    await _number(rt, org, "pn-new", bought="2026-11-20")  # bought this month: its price paid November
    telephony = FakeTelephony()
    clock.value_ms = at(2026, 11, 1, 0)
    first = await charge_rent(rt, telephony)
    assert (first.month, first.charged) == ("2026-11", 1)
    for day in (1, 2, 9, 20):  # the cron runs all month; Redis forgets the key after 7 days
        clock.value_ms = at(2026, 11, day)
        assert (await charge_rent(rt, telephony)).charged == 0
    # Even if the number's own record of payment were lost, the ledger key stops a second charge
    # (Redis forgot the key by now: without the ledger check this would charge again).
    await drain_org_fully(rt, org)
    await rt.pg.execute("UPDATE phone_numbers SET rent_paid_month = NULL WHERE vapi_phone_number_id = 'pn-paid'")
    again = await charge_rent(rt, telephony)
    assert (again.charged, again.already_paid) == (0, 1)
    clock.value_ms = at(2026, 12, 1, 1)
    december = await charge_rent(rt, telephony)
    assert december.charged == 2
    assert sorted(await _rent_rows(rt, org)) == sorted(
        [
            (rent_ledger_key(org, "pn-paid", "2026-11"), -1000),
            (rent_ledger_key(org, "pn-paid", "2026-12"), -1000),
            (rent_ledger_key(org, "pn-new", "2026-12"), -1000),
        ]
    )
    assert await _alerts(rt, org) == []
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_rejects") == 0
    assert (
        await rt.pg.fetchval(
            "SELECT 1 FROM ledger_entries WHERE idempotency_key = $1", rent_ledger_key(org, "pn-paid", "2026-11")
        )
        == 1
    )


async def test_unpaid_rent_alerts_then_suspends_then_a_top_up_reactivates(rt: Runtime, clock: ManualClock) -> None:
    org = await new_org(rt, 500)  # less than a month's rent
    await _number(rt, org, "pn-late")
    telephony = FakeTelephony()
    clock.value_ms = at(2026, 11, 1)
    report = await charge_rent(rt, telephony)
    assert (report.charged, report.unpaid, report.suspended) == (0, 1, 0)
    assert await _alerts(rt, org) == ["rent_failed"]
    clock.value_ms = at(2026, 11, 5)
    await charge_rent(rt, telephony)
    assert await _alerts(rt, org) == ["rent_failed"]  # once a month, not once a run
    assert await number_owner(rt, "pn-late") is not None  # still works inside the grace
    clock.value_ms = at(2026, 11, 8, 13)  # 7 days into the month
    assert (await charge_rent(rt, telephony)).suspended == 1
    assert await _alerts(rt, org) == ["rent_failed", "number_suspended"]
    assert await number_owner(rt, "pn-late") is None  # calls to it are refused now
    assert (
        await rt.pg.fetchval("SELECT status FROM phone_numbers WHERE vapi_phone_number_id = 'pn-late'") == "suspended"
    )
    assert (await credit(rt, org, "pay-up", 2_000)).applied
    clock.value_ms = at(2026, 11, 9)
    report = await charge_rent(rt, telephony)
    assert (report.charged, report.reactivated) == (1, 1)
    assert await _alerts(rt, org) == ["rent_failed", "number_suspended", "number_reactivated"]
    assert await number_owner(rt, "pn-late") == Owner(org, "a", active=True)
    assert await _rent_rows(rt, org) == [(rent_ledger_key(org, "pn-late", "2026-11"), -1000)]
    assert telephony.released == []
    # Each alert's payload is the JSON object the org's webhook receives (not a JSON string of it).
    payloads = await rt.pg.fetch("SELECT payload FROM alert_events WHERE org_id = $1 ORDER BY id", org)
    assert [(p["payload"]["type"], p["payload"]["phone_number_id"]) for p in payloads] == [
        ("rent_failed", "pn-late"),
        ("number_suspended", "pn-late"),
        ("number_reactivated", "pn-late"),
    ]


async def test_rent_unpaid_past_the_release_day_releases_the_number_once(rt: Runtime, clock: ManualClock) -> None:
    org = await new_org(rt, 0)
    await _number(rt, org, "pn-gone")
    telephony = FakeTelephony()
    for day in (1, 10, 25):
        clock.value_ms = at(2026, 11, day)
        await charge_rent(rt, telephony)
    assert telephony.released == []
    clock.value_ms = at(2026, 11, 1) + 30 * DAY_MS
    assert (await charge_rent(rt, telephony)).released == 1
    assert telephony.released == ["pn-gone"]
    assert await _alerts(rt, org) == ["rent_failed", "number_suspended", "number_released"]
    assert await rt.pg.fetchval("SELECT status FROM phone_numbers WHERE vapi_phone_number_id = 'pn-gone'") == "released"
    assert (await credit(rt, org, "too-late", 5_000)).applied
    clock.value_ms = at(2027, 1, 2)
    await charge_rent(rt, telephony)  # a released number is never charged again
    assert telephony.released == ["pn-gone"] and await _rent_rows(rt, org) == []


async def test_two_workers_charging_at_once_charge_once(rt: Runtime, clock: ManualClock) -> None:
    import asyncio

    org = await new_org(rt, 100_000)
    for i in range(20):
        await _number(rt, org, f"pn-{i}")
    clock.value_ms = at(2026, 11, 1)
    reports = await asyncio.gather(*[charge_rent(rt, FakeTelephony()) for _ in range(4)])
    assert sum(r.charged for r in reports) == 20
    assert len(await _rent_rows(rt, org)) == 20


async def test_numbers_that_cannot_pay_never_hide_the_ones_after_them(
    rt: Runtime, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of numbers that stay unpaid (a fixed LIMIT returned the same ones every run) must not
    starve the numbers after them: one run reaches every due number."""
    monkeypatch.setattr(rent, "numbers_per_page", 2)
    broke, paying = await new_org(rt, 0), await new_org(rt, 10_000)
    for i in range(5):
        await _number(rt, broke, f"pn-0{i}")
    await _number(rt, paying, "pn-9")
    clock.value_ms = at(2026, 11, 2)
    report = await charge_rent(rt, FakeTelephony())
    assert (report.unpaid, report.charged) == (5, 1)
    assert await _rent_rows(rt, paying) == [(rent_ledger_key(paying, "pn-9", "2026-11"), -1000)]
