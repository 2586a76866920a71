"""The migrations on a database that already has data: 0005 (orgs' Vapi profile) adds nullable
columns, so existing orgs keep today's behaviour, with named checks; and it downgrades cleanly."""

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic import command

from credit_engine.engine.db import asyncpg_dsn, with_database
from credit_engine.engine.migrate import alembic_config
from tests.services import Services, _admin, drop_database

PROFILE_COLUMNS = ("forward_url", "refusal_no_credit", "refusal_busy", "refusal_not_set_up", "refusal_try_later")


@pytest.fixture
async def empty_database(services: Services) -> AsyncIterator[str]:
    name = f"ce_test_migrate_{secrets.token_hex(4)}"
    await _admin(services.pg_admin_url, f'CREATE DATABASE "{name}"')
    yield with_database(services.pg_admin_url, name)
    await drop_database(services.pg_admin_url, name)


async def migrate(database_url: str, step: str, revision: str) -> None:
    run = command.upgrade if step == "upgrade" else command.downgrade
    await asyncio.to_thread(run, alembic_config(database_url), revision)  # Alembic runs its own event loop


async def columns(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'orgs'")
    return {row["column_name"] for row in rows}


async def test_0005_upgrades_a_database_with_orgs_and_downgrades(empty_database: str) -> None:
    await migrate(empty_database, "upgrade", "0004")
    conn = await asyncpg.connect(asyncpg_dsn(empty_database))
    try:
        await conn.execute(
            "INSERT INTO orgs (org_id, name, rate_pence_per_minute) VALUES ('old-1', 'Old', 60), ('old-2', 'Old', 30)"
        )
        await conn.execute("INSERT INTO org_balances (org_id) VALUES ('old-1'), ('old-2')")
        await migrate(empty_database, "upgrade", "0005")
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == "0005"
        rows = await conn.fetch(
            f"SELECT org_id, rate_pence_per_minute, {', '.join(PROFILE_COLUMNS)} FROM orgs ORDER BY org_id"
        )
        assert [tuple(row.values()) for row in rows] == [("old-1", 60, *[None] * 5), ("old-2", 30, *[None] * 5)]
        await conn.execute(
            "UPDATE orgs SET refusal_busy = 'Busy.', forward_url = 'https://p.test/' WHERE org_id = 'old-1'"
        )
        for column, bad in (
            ("refusal_busy", ""),
            ("refusal_busy", "   "),
            ("refusal_no_credit", "x" * 501),
            ("refusal_not_set_up", ""),
            ("refusal_try_later", " "),
            ("forward_url", ""),
            ("forward_url", "https://p.test/" + "p" * 2000),
        ):
            with pytest.raises(asyncpg.CheckViolationError, match=f"orgs_chk_{column}_length"):
                await conn.execute(f"UPDATE orgs SET {column} = $1 WHERE org_id = 'old-2'", bad)
        await migrate(empty_database, "downgrade", "0004")
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == "0004"
        assert not set(PROFILE_COLUMNS) & await columns(conn)
        assert await conn.fetchval("SELECT count(*) FROM orgs") == 2
        await migrate(empty_database, "upgrade", "head")  # and back up again
        assert set(PROFILE_COLUMNS) <= await columns(conn)
    finally:
        await conn.close()


async def test_0006_keeps_finished_claims_and_downgrades(empty_database: str) -> None:
    """0006 lets a claim keep the engine's result: a claim finished before it keeps its HTTP
    answer (replayed verbatim); a finished claim has exactly one of the two, a result an object.
    Downgrading writes each result back as the HTTP answer this release gives it."""
    await migrate(empty_database, "upgrade", "0005")
    conn = await asyncpg.connect(asyncpg_dsn(empty_database))
    insert = (
        "INSERT INTO idempotent_requests (org_id, operation, idempotency_key, request_sha256, request_body, "
        "state, response_status, response_body{}) VALUES ($1, $2, 'k', '\\x00', '{{}}', $3, $4, $5{})"
    )
    with_result = insert.format(", result", ", $6")
    try:
        await conn.execute(insert.format("", ""), "old", "topup", "done", 201, '{"applied": true}')
        await migrate(empty_database, "upgrade", "0006")
        row = await conn.fetchrow("SELECT response_status, response_body, result FROM idempotent_requests")
        assert tuple(row.values()) == (201, '{"applied": true}', None)
        for state, status, result in (
            ("done", 201, '{"outcome": "ok"}'),
            ("done", None, None),
            ("in_progress", 201, None),
            ("done", None, "null"),
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(with_result, "bad", "topup", state, status, None, result)
        topped = {"outcome": "ok", "transaction_id": 7, "balance_pence": 90, "available_pence": None, "applied": False}
        number = {"id": "pn-1", "number": "+1", "status": "active"}
        bought = {"outcome": "bought", "price_pence": 1000, "phone_number": number, "balance_pence": 4000}
        failed = {"outcome": "provider_failed", "price_pence": 1000, "refund_transaction_id": 9}
        for org, operation, result in (("t", "topup", topped), ("b", "provision", bought), ("f", "provision", failed)):
            await conn.execute(with_result, org, operation, "done", None, None, json.dumps(result))
        await conn.execute(with_result, "x", "future", "done", None, None, '{"outcome": "ok"}')
        await migrate(empty_database, "downgrade", "0005")
        rows = await conn.fetch("SELECT org_id, response_status, response_body FROM idempotent_requests ORDER BY 1")
        answers = {row["org_id"]: (row["response_status"], json.loads(row["response_body"])) for row in rows}
        assert answers == {
            "old": (201, {"applied": True}),
            "t": (201, {"transaction_id": 7, "balance_pence": 90, "available_pence": None, "applied": False}),
            "b": (201, {"phone_number": number, "charged_pence": 1000, "balance_pence": 4000}),
            "f": (
                502,
                {
                    "error": {
                        "code": "provider_failed",
                        "message": "the telephony provider could not supply a number; the charge was refunded",
                        "refunded_pence": 1000,
                        "refund_transaction_id": 9,
                    }
                },
            ),
        }
    finally:
        await conn.close()
