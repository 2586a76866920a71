"""Credits are Postgres-first: committed to the ledger, then applied to Redis, healed if that fails."""

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from credit_engine.engine import limits
from credit_engine.engine.balances import read_wallet
from credit_engine.engine.credits import apply_pending_credits, credit
from credit_engine.engine.embedded import free_port
from credit_engine.engine.errors import InvalidInput, OrgNotFound
from credit_engine.engine.reconciler import check, repair
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime, redis_client
from credit_engine.engine.types import EntryKind
from tests.helpers import new_org


@pytest.fixture
async def rt_without_redis(rt: Runtime) -> AsyncIterator[Runtime]:
    """The same Postgres, a Redis that is not there: every Redis step fails."""
    dead = redis_client(f"redis://127.0.0.1:{free_port()}/0", 2)
    yield replace(rt, redis=dead)
    await dead.aclose()


async def test_a_topup_is_in_the_ledger_and_in_redis(rt: Runtime) -> None:
    org = await new_org(rt)
    result = await credit(rt, org, "pay-1", 2500)
    assert (result.outcome, result.applied) == (Outcome.ok, True)
    assert result.money is not None and result.money.balance_pence == 2500
    row = await rt.pg.fetchrow("SELECT * FROM ledger_entries WHERE id = $1", result.entry_id)
    assert (row["kind"], row["amount_pence"], row["source"]) == ("topup", 2500, "postgres")
    assert await rt.pg.fetchval("SELECT count(*) FROM pending_credits") == 0
    assert (await rt.pg.fetchrow("SELECT balance_pence FROM org_balances WHERE org_id = $1", org))[0] == 2500


async def test_a_replayed_topup_credits_once(rt: Runtime) -> None:
    org = await new_org(rt)
    first = await credit(rt, org, "pay-1", 2500)
    again = await credit(rt, org, "pay-1", 2500)
    assert again.outcome == Outcome.replayed
    assert again.entry_id == first.entry_id
    assert again.money is not None and again.money.balance_pence == 2500
    conflict = await credit(rt, org, "pay-1", 2600)
    assert conflict.outcome == Outcome.idempotency_conflict
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE org_id = $1", org) == 1


async def test_a_refund_and_a_topup_may_share_a_client_key(rt: Runtime) -> None:
    org = await new_org(rt)
    await credit(rt, org, "k", 100)
    refund = await credit(rt, org, "k", 100, kind=EntryKind.refund)
    assert refund.outcome == Outcome.ok
    assert refund.money is not None and refund.money.balance_pence == 200


async def test_bad_credits_are_refused_and_write_nothing(rt: Runtime) -> None:
    org = await new_org(rt)
    with pytest.raises(OrgNotFound):
        await credit(rt, "no-such-org", "k", 100)
    with pytest.raises(InvalidInput) as error:
        await credit(rt, org, "k", 0)
    assert error.value.field == "amount_pence"
    await credit(rt, org, "big", limits.amount_pence_max)
    for i in range(9):
        await credit(rt, org, f"big-{i}", limits.amount_pence_max)
    with pytest.raises(InvalidInput, match="above"):
        await credit(rt, org, "one-more", 1)
    assert await rt.pg.fetchval("SELECT count(*) FROM ledger_entries WHERE idempotency_key LIKE '%one-more'") == 0


async def test_a_topup_whose_redis_step_failed_is_kept_and_applied_later(
    rt: Runtime, rt_without_redis: Runtime
) -> None:
    org = await new_org(rt, 100)
    result = await credit(rt_without_redis, org, "pay-1", 900)
    assert (result.outcome, result.applied, result.money) == (Outcome.ok, False, None)
    # The money is in Postgres, waiting for Redis: not lost, not yet spendable.
    assert await rt.pg.fetchval("SELECT count(*) FROM pending_credits") == 1
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 100
    # The reconciler knows a credit is on its way: this is not drift.
    assert (await check(rt, [org])).clean
    report = await apply_pending_credits(rt, older_than_ms=0)
    assert (report.applied, report.failed) == (1, 0)
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 1000
    assert await rt.pg.fetchval("SELECT count(*) FROM pending_credits") == 0
    # Applying again is a replay, never a second credit.
    again = await credit(rt, org, "pay-1", 900)
    assert again.outcome == Outcome.replayed
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 1000


async def test_the_reconciler_heals_a_topup_whose_redis_step_failed(rt: Runtime, rt_without_redis: Runtime) -> None:
    org = await new_org(rt, 100)
    await credit(rt_without_redis, org, "pay-1", 900)
    report = await repair(rt, [org])
    assert report.after.clean
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 1000
    assert await rt.pg.fetchval("SELECT count(*) FROM pending_credits") == 0
    # The worker's job finds nothing left to do, and a replay still credits nothing.
    assert (await apply_pending_credits(rt, older_than_ms=0)).applied == 0
    assert (await credit(rt, org, "pay-1", 900)).outcome == Outcome.replayed
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 1000


async def test_credit_metadata_is_stored_as_a_json_object(rt: Runtime) -> None:
    org = await new_org(rt)
    await credit(rt, org, "k", 100, meta={"source": "stripe", "payment": "pi_1"})
    row = await rt.pg.fetchrow(
        "SELECT jsonb_typeof(meta) AS kind, meta->>'payment' AS payment FROM ledger_entries WHERE org_id = $1", org
    )
    assert (row["kind"], row["payment"]) == ("object", "pi_1")


async def test_a_credit_stuck_too_long_is_reported_and_repaired(rt: Runtime, rt_without_redis: Runtime) -> None:
    from credit_engine.engine.clock import RedisClock

    rt.clock = RedisClock()  # ages are compared with Postgres's clock: use the real one
    org = await new_org(rt, 100)
    await credit(rt_without_redis, org, "pay-1", 900)
    await rt.pg.execute("UPDATE pending_credits SET created_at = now() - interval '10 minutes'")
    report = await check(rt, [org])
    assert any("still not in Redis" in p for d in report.drifted for p in d.problems)
    # Past half the idempotency window the worker will not apply it by key: a repair does.
    rt.settings = replace(rt.settings, idempotency_ttl_ms=60_000)
    pending = await apply_pending_credits(rt, older_than_ms=0)
    assert (pending.applied, pending.too_old_orgs) == (0, {org})
    assert (await repair(rt, [org])).after.clean
    wallet = await read_wallet(rt, org)
    assert wallet is not None and wallet.balance_pence == 1000
    assert await rt.pg.fetchval("SELECT count(*) FROM pending_credits") == 0
