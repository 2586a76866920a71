"""The ledger in Postgres: written exactly once from the outbox, invariants held by the database."""

import json

import asyncpg
import pytest

from credit_engine.engine.assets import deduct_asset
from credit_engine.engine.holds import CallEvent, check_call, commit_call, reserve_call
from credit_engine.engine.ledger import write_batch
from credit_engine.engine.outbox import drain_org_fully, drain_orgs, parse_entry
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from tests.helpers import new_org


async def ledger(rt: Runtime, org_id: str) -> list[asyncpg.Record]:
    return await rt.pg.fetch("SELECT * FROM ledger_entries WHERE org_id = $1 ORDER BY id", org_id)


async def projection(rt: Runtime, org_id: str) -> asyncpg.Record:
    return await rt.pg.fetchrow("SELECT * FROM org_balances WHERE org_id = $1", org_id)


async def test_drain_writes_every_entry_once_and_the_projection_follows(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 100)
    await deduct_asset(rt, org, "b", 50)
    await reserve_call(rt, org, "c")
    await commit_call(rt, org, "c", 30)
    assert await drain_org_fully(rt, org) == 5  # 3 ledger entries, 2 hold events
    rows = await ledger(rt, org)
    assert [(r["kind"], r["amount_pence"], r["balance_after_pence"]) for r in rows] == [
        ("topup", 1000, 1000),
        ("asset", -100, 900),
        ("asset", -50, 850),
        ("call_charge", -30, 820),
    ]
    p = await projection(rt, org)
    assert (p["balance_pence"], p["debt_pence"], p["entry_count"], p["last_entry_id"]) == (820, 0, 4, rows[-1]["id"])
    assert await rt.redis.xlen(rt.keys.org(org).outbox) == 0
    hold = await rt.pg.fetchrow("SELECT * FROM call_holds WHERE org_id = $1 AND call_id = 'c'", org)
    assert (hold["status"], hold["charged_pence"], hold["billed_seconds"]) == ("committed", 30, 30)


async def test_a_redelivered_batch_is_recognised_and_not_written_twice(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 100)
    await reserve_call(rt, org, "c")
    raw = await rt.redis.xrange(rt.keys.org(org).outbox)
    items = [parse_entry(stream_id, fields) for stream_id, fields in raw]
    entries = [i for i in items if hasattr(i, "idempotency_key")]
    events = [i for i in items if not hasattr(i, "idempotency_key")]
    async with rt.pg.acquire() as conn:
        first = await write_batch(conn, entries, events)  # type: ignore[arg-type]
        again = await write_batch(conn, entries, events)  # type: ignore[arg-type]
    assert (first.inserted, first.redelivered) == (1, 0)
    assert (again.inserted, again.redelivered, again.duplicates) == (0, 1, 0)
    assert len(await ledger(rt, org)) == 2
    assert (await projection(rt, org))["balance_pence"] == 900


async def test_the_same_key_with_a_different_decision_is_kept_as_evidence_not_written(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    await deduct_asset(rt, org, "a", 100)
    await drain_org_fully(rt, org)
    # Redis forgets the idempotency record (as if it lost it). The engine asks the ledger first
    # and answers the replay from it...
    await rt.redis.delete(rt.keys.org(org).idem, rt.keys.org(org).idem_exp)
    assert (await deduct_asset(rt, org, "a", 100)).outcome == Outcome.replayed
    # ...but should Redis decide the same key again anyway (the script run on its own, as a
    # release without that check would), the ledger keeps the evidence and writes nothing twice.
    keys = rt.keys.org(org)
    reply = await rt.scripts.run(
        rt.redis,
        "asset_deduct",
        [keys.org, keys.idem, keys.idem_exp, keys.outbox],
        [0, org, f"{org}/asset/a", 100, "", rt.settings.idempotency_ttl_ms, 1000, "{}"],
    )
    assert reply[0] == Outcome.ok
    result = await drain_orgs(rt, [org])
    assert (result.written.inserted, result.written.duplicates) == (0, 1)
    assert len([r for r in await ledger(rt, org) if r["kind"] == "asset"]) == 1
    reject = await rt.pg.fetchrow("SELECT * FROM ledger_rejects WHERE org_id = $1", org)
    assert reject["reason"] == "duplicate_idempotency_key"
    assert json.loads(reject["entry"])["amount_pence"] == -100
    assert (await projection(rt, org))["balance_pence"] == 900


async def test_the_ledger_is_append_only(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    for statement in (
        "UPDATE ledger_entries SET amount_pence = 1 WHERE org_id = $1",
        "DELETE FROM ledger_entries WHERE org_id = $1",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await rt.pg.execute(statement, org)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await rt.pg.execute("TRUNCATE ledger_entries CASCADE")
    assert len(await ledger(rt, org)) == 1


async def insert_raw(
    conn: asyncpg.Connection, org: str, key: str, amount: int, balance_after: int, kind: str = "asset"
) -> None:
    await conn.execute(
        """INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, balance_after_pence,
               debt_after_pence, source, created_at) VALUES ($1, $2, $3, $4, $5, 0, 'redis', now())""",
        org,
        key,
        kind,
        amount,
        balance_after,
    )


async def test_an_entry_that_breaks_the_balance_chain_is_refused(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    async with rt.pg.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="breaks the chain"):
            await insert_raw(conn, org, f"{org}/asset/x", -100, 950)  # 1000 - 100 is not 950


async def test_a_projection_left_behind_fails_the_commit(rt: Runtime) -> None:
    org = await new_org(rt, 1000)
    async with rt.pg.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await insert_raw(conn, org, f"{org}/asset/x", -100, 900)  # the chain is fine...
        with pytest.raises(asyncpg.CheckViolationError, match="projection does not match"):
            await tx.commit()  # ...but org_balances was not moved: refused at COMMIT
    assert len(await ledger(rt, org)) == 1


@pytest.mark.parametrize(
    ("kind", "amount", "debt_delta", "constraint"),
    [
        ("asset", 100, 0, "ledger_entries_chk_asset_zero_debt"),
        ("asset", -100, 5, "ledger_entries_chk_asset_zero_debt"),
        ("call_charge", 10, 0, "ledger_entries_chk_charge_is_debit"),
        ("debt_repayment", -10, 0, "ledger_entries_chk_repayment_pays_debt"),
        ("nonsense", -1, 0, "ledger_entries_chk_kind"),
    ],
)
async def test_entry_kinds_carry_their_sign(
    rt: Runtime, kind: str, amount: int, debt_delta: int, constraint: str
) -> None:
    org = await new_org(rt, 1000)
    # A consistent chain (the BEFORE INSERT trigger runs first), so the kind's CHECK is what refuses.
    with pytest.raises(asyncpg.CheckViolationError, match=constraint):
        await rt.pg.execute(
            """INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, debt_delta_pence,
                   balance_after_pence, debt_after_pence, source, created_at, call_id)
               VALUES ($1, 'k', $2, $3::bigint, $4::bigint, 1000 + $3::bigint, $4::bigint, 'redis', now(),
                       CASE WHEN $2 LIKE 'call%' THEN 'c' END)""",
            org,
            kind,
            amount,
            debt_delta,
        )


async def test_debt_reaches_postgres_and_the_chain_holds_across_repayment(rt: Runtime) -> None:
    from credit_engine.engine.credits import credit

    org = await new_org(rt, 100)
    await commit_call(rt, org, "c", 300)  # 300p against 100p, overdraft 0: 200p debt
    repaid = await credit(rt, org, "t2", 500)
    assert repaid.money is not None
    assert (repaid.money.balance_pence, repaid.money.debt_pence) == (300, 0)
    await drain_org_fully(rt, org)
    rows = await ledger(rt, org)
    # Postgres order: the Postgres-first top-up is in before the drained Redis-first entries;
    # the chain holds in that order.
    assert [
        (r["kind"], r["amount_pence"], r["debt_delta_pence"], r["balance_after_pence"], r["debt_after_pence"])
        for r in rows
    ] == [
        ("topup", 100, 0, 100, 0),
        ("topup", 500, 0, 600, 0),
        ("call_charge", -100, 200, 500, 200),
        ("debt_repayment", -200, -200, 300, 0),
    ]
    p = await projection(rt, org)
    assert (p["balance_pence"], p["debt_pence"]) == (300, 0)


async def test_hold_events_follow_the_state_machine(rt: Runtime) -> None:
    org = await new_org(rt, 10_000)
    await reserve_call(rt, org, "c")
    await check_call(rt, org, "c", CallEvent.start)
    await drain_org_fully(rt, org)
    row = await rt.pg.fetchrow("SELECT * FROM call_holds WHERE call_id = 'c'")
    assert (row["status"], row["version"]) == ("live", 2)
    assert row["started_at"] is not None
    await commit_call(rt, org, "c", 10)
    await drain_org_fully(rt, org)
    row = await rt.pg.fetchrow("SELECT * FROM call_holds WHERE call_id = 'c'")
    assert (row["status"], row["charged_pence"]) == ("committed", 10)
    assert row["resolved_at"] is not None


async def test_a_report_field_holding_the_text_of_a_nul_escape_is_written_as_given(rt: Runtime) -> None:
    """NUL is stripped from values, never from the encoded JSON: a value holding the six
    characters \\u0000 (and one ending in a backslash before a quote) stays valid JSON."""
    org = await new_org(rt, 1000)
    reasons = ["customer\\u0000ended", 'tail\\u0000"', "real\x00nul"]
    for i, reason in enumerate(reasons):
        assert (await commit_call(rt, org, f"c{i}", 6, meta={"ended_reason": reason})).outcome == Outcome.ok
    await drain_org_fully(rt, org)
    rows = await rt.pg.fetch(
        "SELECT meta->>'ended_reason' AS reason FROM ledger_entries WHERE org_id = $1 AND kind = 'call_charge' "
        "ORDER BY id",
        org,
    )
    assert [r["reason"] for r in rows] == ["customer\\u0000ended", 'tail\\u0000"', "realnul"]
    assert await rt.redis.xlen(rt.keys.org(org).outbox + ":dead") == 0
