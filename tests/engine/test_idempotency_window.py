"""Redis forgets idempotency records after CREDIT_ENGINE_IDEMPOTENCY_TTL_S (7 days by default);
Postgres keeps them forever. A replay that arrives after Redis forgot is still caught."""

from engine.balances import read_wallet
from engine.clock import ManualClock
from engine.holds import commit_call, reserve_call
from engine.outbox import drain_org_fully
from engine.provisioning import ProvisionRequest, provision
from engine.reconciler import check
from engine.results import Outcome
from engine.runtime import Runtime
from engine.telephony import FakeTelephony
from engine.idempotency import call_state_key
from tests.helpers import new_org


async def _past_the_window(rt: Runtime, clock: ManualClock, org: str) -> None:
    clock.value_ms += rt.settings.idempotency_ttl_ms + 86_400_000
    # Any commit prunes the org's expired records; this one is a call of its own.
    assert (await commit_call(rt, org, "pruner", 1)).outcome == Outcome.ok


async def test_a_report_replayed_after_redis_forgot_the_call_is_not_billed_again(rt: Runtime, clock: ManualClock) -> None:
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
    charges = await rt.pg.fetch("SELECT call_id, amount_pence FROM ledger_entries WHERE org_id = $1 AND call_id IS NOT NULL "
                                "ORDER BY call_id", org)  # fmt: skip
    assert [(r["call_id"], r["amount_pence"]) for r in charges] == [("direct-call", -30), ("held-call", -60), ("pruner", -1)]
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_rejects") == 0
    assert (await check(rt, [org])).clean
    # A call Postgres has never seen is still billed directly.
    assert (await commit_call(rt, org, "new-outbound", 10)).outcome == Outcome.ok


async def test_a_purchase_replayed_after_redis_forgot_its_key_is_answered_from_postgres(rt: Runtime, clock: ManualClock) -> None:
    org = await new_org(rt, 5_000)
    telephony = FakeTelephony()
    first = await provision(rt, telephony, org, "buy-1", ProvisionRequest("415", None), 1000)
    assert first.status == 201
    await drain_org_fully(rt, org)
    await _past_the_window(rt, clock, org)
    again = await provision(rt, telephony, org, "buy-1", ProvisionRequest("415", None), 1000)
    assert (again.status, again.body, again.replayed) == (201, first.body, True)
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 5_000 - 1000 - 1
    await drain_org_fully(rt, org)
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE org_id = $1 AND kind = 'asset'", org) == 1
