"""Redis forgets idempotency records after CREDIT_ENGINE_IDEMPOTENCY_TTL_S (7 days by default);
Postgres keeps them forever. A replay that arrives after Redis forgot is still caught."""

from datetime import UTC, datetime

from credit_engine.engine.assets import charge_asset, deduct_asset
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.credits import credit
from credit_engine.engine.holds import commit_call, reserve_call
from credit_engine.engine.idempotency import call_state_key, credit_ledger_key, legacy_rent_ledger_key, rent_ledger_key
from credit_engine.engine.idempotent_requests import Claim
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.phone_numbers import number_for_provision_key, register_number
from credit_engine.engine.provisioning import Provided, ProvisionRequest, provision
from credit_engine.engine.reconciler import check, repair
from credit_engine.engine.rent import charge_rent
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import FakeTelephony
from tests.helpers import assert_books_agree, new_org


async def _past_the_window(rt: Runtime, clock: ManualClock, org: str) -> None:
    clock.value_ms += rt.settings.idempotency_ttl_ms + 86_400_000
    # Any commit prunes the org's expired records; this one is a call of its own.
    assert (await commit_call(rt, org, "pruner", 1)).outcome == Outcome.ok


async def test_a_report_replayed_after_redis_forgot_the_call_is_not_billed_again(
    rt: Runtime, clock: ManualClock
) -> None:
    org = await new_org(rt, 10_000)
    assert (await reserve_call(rt, org, "held-call")).outcome == Outcome.ok
    assert (await commit_call(rt, org, "held-call", 60)).charged_pence == 60
    assert (await commit_call(rt, org, "direct-call", 30)).charged_pence == 30  # never reserved: billed directly
    await drain_org_fully(rt, org)
    await _past_the_window(rt, clock, org)
    for call_id in ("held-call", "direct-call"):
        assert await rt.redis.hget(rt.keys.org(org).idem, call_state_key(org, call_id)) is None  # Redis forgot
    before = await read_wallet(rt, org)
    replays = [await commit_call(rt, org, "held-call", 60), await commit_call(rt, org, "direct-call", 30)]
    assert [(r.outcome, r.charged_pence) for r in replays] == [(Outcome.replayed, 60), (Outcome.replayed, 30)]
    assert await read_wallet(rt, org) == before
    await drain_org_fully(rt, org)
    charges = await rt.pg.fetch(
        "SELECT call_id, amount_pence FROM ledger_entries WHERE org_id = $1 AND call_id IS NOT NULL ORDER BY call_id",
        org,
    )
    assert [(r["call_id"], r["amount_pence"]) for r in charges] == [
        ("direct-call", -30),
        ("held-call", -60),
        ("pruner", -1),
    ]
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_rejects") == 0
    assert (await check(rt, [org])).clean
    # A call Postgres has never seen is still billed directly.
    assert (await commit_call(rt, org, "new-outbound", 10)).outcome == Outcome.ok


async def test_a_purchase_replayed_after_redis_forgot_its_key_is_answered_from_postgres(
    rt: Runtime, clock: ManualClock
) -> None:
    org = await new_org(rt, 5_000)
    telephony = FakeTelephony()
    first = await provision(rt, telephony, org, "buy-1", ProvisionRequest("415", None), 1000)
    assert first.result is not None and first.result.outcome == Provided.bought
    await drain_org_fully(rt, org)
    await _past_the_window(rt, clock, org)
    again = await provision(rt, telephony, org, "buy-1", ProvisionRequest("415", None), 1000)
    assert (again.claim, again.result) == (Claim.replay, first.result)
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 5_000 - 1000 - 1
    await drain_org_fully(rt, org)
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE org_id = $1 AND kind = 'asset'", org) == 1


async def test_a_top_up_replayed_after_redis_forgot_it_is_not_credited_again(rt: Runtime, clock: ManualClock) -> None:
    """`credit-engine topup --idempotency-key K` run again a week later (or an admin top-up whose
    claim stayed in progress, retried): Postgres has the entry, Redis has forgotten its record."""
    org = await new_org(rt, 0)
    first = await credit(rt, org, "topup-1", 500)
    assert (first.outcome, first.applied) == (Outcome.ok, True)
    await _past_the_window(rt, clock, org)
    assert await rt.redis.hget(rt.keys.org(org).idem, credit_ledger_key(org, "topup", "topup-1")) is None
    again = await credit(rt, org, "topup-1", 500)
    assert (again.outcome, again.entry_id, again.applied) == (Outcome.replayed, first.entry_id, True)
    assert again.money is not None and again.money.balance_pence == 500 - 1  # the pruner's 1p, nothing credited twice
    # The extra credit would have bought this; now it is refused, and the books agree.
    assert (await deduct_asset(rt, org, "greedy", 600)).outcome == Outcome.insufficient_funds
    assert await assert_books_agree(rt, org) == 499


async def test_a_pending_top_up_replayed_is_applied_once_and_a_stale_one_is_left_to_repair(
    rt: Runtime, clock: ManualClock
) -> None:
    org = await new_org(rt, 0)
    # Committed in Postgres, never applied in Redis (its process died between the two).
    first = await credit(rt, org, "topup-2", 300)
    await rt.redis.hdel(rt.keys.org(org).idem, credit_ledger_key(org, "topup", "topup-2"))
    await rt.redis.hincrby(rt.keys.org(org).org, "balance_pence", -300)
    await rt.pg.execute(
        "INSERT INTO pending_credits (idempotency_key, org_id, amount_pence) VALUES ($1, $2, 300)",
        first.ledger_key,
        org,
    )
    replay = await credit(rt, org, "topup-2", 300)
    assert (replay.outcome, replay.applied) == (Outcome.replayed, True)
    assert await rt.pg.fetchval("SELECT count(*) FROM pending_credits WHERE org_id = $1", org) == 0
    assert await assert_books_agree(rt, org) == 300
    # Pending for longer than half the window: a replay applies nothing by key alone.
    await rt.pg.execute(
        "INSERT INTO pending_credits (idempotency_key, org_id, amount_pence, created_at) "
        "VALUES ($1, $2, 300, now() - interval '30 days')",
        first.ledger_key,
        org,
    )
    stale = await credit(rt, org, "topup-2", 300)
    assert (stale.outcome, stale.applied) == (Outcome.replayed, False)
    assert (await read_wallet(rt, org)).balance_pence == 300  # type: ignore[union-attr]


async def test_a_purchase_keyed_like_rent_gets_no_free_rent_and_no_free_number(rt: Runtime, clock: ManualClock) -> None:
    """Client keys cannot reach the rent's keys: a purchase keyed like next month's rent that fails
    (refunded) does not make that month paid, and one keyed like a month an earlier release paid
    (its rent entry under the old key) is refused by the ledger before Redis charges it."""
    org = await new_org(rt, 10_000)
    number = "pn-rented"
    await register_number(rt, org, number, number="+15550009999", assistant_id="a", provider="fake", status="active")
    await rt.pg.execute("UPDATE phone_numbers SET created_at = '2026-10-15' WHERE vapi_phone_number_id = $1", number)
    telephony = FakeTelephony()
    clock.value_ms = _at(2026, 11, 15)
    # An earlier release charged November's rent under the client namespace.
    legacy = legacy_rent_ledger_key(org, number, "2026-11")
    meta = {"asset": "phone_number_rent", "phone_number_id": number, "month": "2026-11"}
    assert (await charge_asset(rt, org, legacy, 1000, meta=meta)).outcome == Outcome.ok
    await rt.pg.execute("UPDATE phone_numbers SET rent_paid_month = '2026-11' WHERE vapi_phone_number_id = $1", number)
    # Next month's rent as a key, on a purchase that fails at the provider (area code 999): refunded.
    failed = await provision(rt, telephony, org, f"rent:{number}:2026-12", ProvisionRequest("999", None), 1000)
    assert failed.result is not None and failed.result.outcome == Provided.provider_failed
    # November's rent as a key, after Redis forgot it: the ledger already has the key.
    await drain_org_fully(rt, org)
    await _past_the_window(rt, clock, org)
    clash = await provision(rt, telephony, org, f"rent:{number}:2026-11", ProvisionRequest("415", None), 1000)
    assert clash.result is not None and clash.result.outcome == Provided.idempotency_conflict
    assert await number_for_provision_key(rt, org, f"rent:{number}:2026-11") is None  # no number, no charge
    clock.value_ms = _at(2026, 12, 1)
    december = await charge_rent(rt, telephony)
    assert (december.charged, december.already_paid) == (1, 0)  # December is charged: no free rent
    await drain_org_fully(rt, org)
    rent = await rt.pg.fetch(
        "SELECT idempotency_key, amount_pence FROM ledger_entries WHERE org_id = $1 AND "
        "meta->>'asset' = 'phone_number_rent' ORDER BY id",
        org,
    )
    assert [(r["idempotency_key"], r["amount_pence"]) for r in rent] == [
        (legacy, -1000),
        (rent_ledger_key(org, number, "2026-12"), -1000),
    ]
    # 10,000 - November - the failed purchase (refunded) - the pruner's 1p - December
    assert await assert_books_agree(rt, org) == 10_000 - 1000 - 1 - 1000
    repaired = await repair(rt, [org])
    assert repaired.repaired == []  # nothing to hand back
    assert await assert_books_agree(rt, org) == 7_999


def _at(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, 12, tzinfo=UTC).timestamp() * 1000)
