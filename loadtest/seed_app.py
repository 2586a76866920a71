"""The seed's design, on our web stack: the status check as a PL/pgSQL function that locks the
org's row (SELECT ... FOR UPDATE), reads the call's reservation and computes the effective
balance; one Postgres round trip per request through asyncpg. Run: uvicorn loadtest.seed_app:app
"""

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS seed_orgs (
    org_id text PRIMARY KEY, balance_pence bigint NOT NULL, held_pence bigint NOT NULL,
    rate_pence_per_minute int NOT NULL);
CREATE TABLE IF NOT EXISTS seed_reservations (
    call_id text PRIMARY KEY, org_id text NOT NULL REFERENCES seed_orgs, reserved_pence bigint NOT NULL,
    started_at timestamptz NOT NULL);
CREATE OR REPLACE FUNCTION seed_status_check(p_org text, p_call text)
RETURNS TABLE (end_call boolean, balance_pence bigint, cost_pence bigint) LANGUAGE plpgsql AS $$
DECLARE
    o seed_orgs%ROWTYPE;
    r seed_reservations%ROWTYPE;
    cost bigint;
BEGIN
    SELECT * INTO o FROM seed_orgs WHERE org_id = p_org FOR UPDATE;
    SELECT * INTO r FROM seed_reservations WHERE call_id = p_call;
    cost := ceil(extract(epoch FROM now() - r.started_at) * o.rate_pence_per_minute / 60);
    RETURN QUERY SELECT (o.balance_pence - o.held_pence + r.reserved_pence - cost) <= 0, o.balance_pence, cost;
END $$;
"""

pool: asyncpg.Pool | None = None


async def check(request: Request) -> Response:
    body = orjson.loads(await request.body())
    assert pool is not None
    row = await pool.fetchrow("SELECT * FROM seed_status_check($1, $2)", body["org_id"], body["call_id"])
    return Response(
        orjson.dumps({"endCall": row["end_call"], "balance_pence": row["balance_pence"]}), media_type="application/json"
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=20, max_size=20)
    yield
    await pool.close()


app = Starlette(routes=[Route("/check", check, methods=["POST"])], lifespan=lifespan)
