"""The migrations on a database that already has data: 0005 (orgs' Vapi profile) adds nullable
columns, so existing orgs keep today's behaviour, with named checks; and it downgrades cleanly."""

import asyncio
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
    answer (replayed verbatim); a finished claim has exactly one of the two."""
    await migrate(empty_database, "upgrade", "0005")
    conn = await asyncpg.connect(asyncpg_dsn(empty_database))
    insert = (
        "INSERT INTO idempotent_requests (org_id, operation, idempotency_key, request_sha256, request_body, "
        "state, response_status, response_body{}) VALUES ($1, 'topup', 'k', '\\x00', '{{}}', $2, $3, $4{})"
    )
    try:
        await conn.execute(insert.format("", ""), "old", "done", 201, '{"applied": true}')
        await migrate(empty_database, "upgrade", "0006")
        row = await conn.fetchrow("SELECT response_status, response_body, result FROM idempotent_requests")
        assert tuple(row.values()) == (201, '{"applied": true}', None)
        await conn.execute(insert.format(", result", ", $5"), "new", "done", None, None, '{"outcome": "ok"}')
        for state, status, result in (
            ("done", 201, '{"outcome": "ok"}'),
            ("done", None, None),
            ("in_progress", 201, None),
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(insert.format(", result", ", $5"), "bad", state, status, None, result)
        await migrate(empty_database, "downgrade", "0005")
        assert [r["org_id"] for r in await conn.fetch("SELECT org_id FROM idempotent_requests")] == ["old"]
    finally:
        await conn.close()
