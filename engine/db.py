"""Postgres connections: raw asyncpg where the volume is, SQLAlchemy only for Alembic."""

import asyncio
import json
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def asyncpg_dsn(database_url: str) -> str:
    """asyncpg takes postgresql://; accept the SQLAlchemy spelling too."""
    parts = urlsplit(database_url)
    scheme = parts.scheme.split("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")
    return urlunsplit(("postgresql", *parts[1:]))


def sqlalchemy_url(database_url: str) -> str:
    return "postgresql+asyncpg" + asyncpg_dsn(database_url).removeprefix("postgresql")


def with_database(database_url: str, name: str) -> str:
    parts = urlsplit(asyncpg_dsn(database_url))
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# A read on a decision path (who pays, was it resolved, whose key is this) waits this long in all,
# for a connection and for the answer: a pool's own `timeout=` bounds only the query, and a
# Postgres that accepts connections but never answers would otherwise hold the caller for
# asyncpg's 60-second connect timeout, past every budget Vapi and clients give us.
lookup_timeout_s = 2.0
connect_timeout_s = 5.0  # one new connection to Postgres (asyncpg's default is 60 s)


def bounded(timeout_s: float = lookup_timeout_s) -> asyncio.Timeout:
    """`async with bounded(): await pool.fetch…(…)`: the connection's wait and the query, together."""
    return asyncio.timeout(timeout_s)


async def create_pool(database_url: str, size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(database_url),
        min_size=1,
        max_size=size,
        command_timeout=30,
        timeout=connect_timeout_s,
        init=_init_connection,
    )
    assert pool is not None
    return pool


async def ping_postgres(pool: asyncpg.Pool, timeout_s: float) -> None:
    """A health probe: returns once Postgres answers a query within timeout_s (the wait for a
    connection included); raises whatever kept it from answering (TimeoutError when it never did)."""
    async with bounded(timeout_s):  # never answering is unreachable too, and quickly
        await pool.fetchval("SELECT 1")
