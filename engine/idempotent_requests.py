"""The first response to each (org, operation, Idempotency-Key), kept so replays get it verbatim.

begin() claims a key: a new key is ours to run; a finished one is a replay of its stored
response; the same key with another request body is a conflict; a key another request is still
running is `in_progress` (unless that request has been silent longer than
CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S, 60 s by default: its process died, and the operation,
idempotent underneath, is run again).
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import orjson

from credit_engine.engine.runtime import Runtime


class Claim(Enum):
    new = "new"
    replay = "replay"
    conflict = "conflict"
    in_progress = "in_progress"


@dataclass(frozen=True)
class Claimed:
    claim: Claim
    status: int | None = None
    body: dict[str, Any] | None = None
    claimed_at: datetime | None = None  # ours, when claim is new: whoever takes a stale claim over restarts it


def request_sha256(request: dict[str, Any]) -> bytes:
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).digest()


async def begin(rt: Runtime, org_id: str, operation: str, key: str, request: dict[str, Any]) -> Claimed:
    digest = request_sha256(request)
    async with rt.pg.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            """
            INSERT INTO idempotent_requests (org_id, operation, idempotency_key, request_sha256, request_body)
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING created_at
            """,
            org_id,
            operation,
            key,
            digest,
            request,
        )
        if inserted:
            return Claimed(Claim.new, claimed_at=inserted)
        row = await conn.fetchrow(
            """
            SELECT request_sha256, state, response_status, response_body,
                   created_at < now() - make_interval(secs => $4) AS stale
            FROM idempotent_requests WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3
            FOR UPDATE
            """,
            org_id,
            operation,
            key,
            rt.settings.idempotent_claim_stale_s,
        )
        if row is None:  # abandoned between our INSERT and SELECT: try once more, fresh
            return await begin(rt, org_id, operation, key, request)
        if bytes(row["request_sha256"]) != digest:
            return Claimed(Claim.conflict)
        if row["state"] == "done":
            return Claimed(Claim.replay, row["response_status"], row["response_body"])
        if row["stale"]:
            claimed_at = await conn.fetchval(
                "UPDATE idempotent_requests SET created_at = clock_timestamp() "
                "WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3 RETURNING created_at",
                org_id,
                operation,
                key,
            )
            return Claimed(Claim.new, claimed_at=claimed_at)
        return Claimed(Claim.in_progress)


async def finish(rt: Runtime, org_id: str, operation: str, key: str, status: int, body: dict[str, Any]) -> None:
    await rt.pg.execute(
        """
        UPDATE idempotent_requests
        SET state = 'done', response_status = $4, response_body = $5, completed_at = now()
        WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3
        """,
        org_id,
        operation,
        key,
        status,
        body,  # the pool's jsonb codec encodes the dict
    )


@dataclass(frozen=True)
class Abandoned:
    """A request still in progress long after its client should have had an answer."""

    org_id: str
    idempotency_key: str
    request: dict[str, Any]


async def stale_claims(rt: Runtime, operation: str, limit: int = 100) -> list[Abandoned]:
    """Claims in progress for longer than `CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S` (60 s), taken over (their clock restarted) so
    that two workers do not finish the same one at once."""
    rows = await rt.pg.fetch(
        """
        UPDATE idempotent_requests SET created_at = now()
        WHERE (org_id, operation, idempotency_key) IN (
            SELECT org_id, operation, idempotency_key FROM idempotent_requests
            WHERE operation = $1 AND state = 'in_progress' AND created_at < now() - make_interval(secs => $2)
            ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED)
        RETURNING org_id, idempotency_key, request_body
        """,
        operation,
        rt.settings.idempotent_claim_stale_s,
        limit,
    )
    return [Abandoned(row["org_id"], row["idempotency_key"], row["request_body"]) for row in rows]


async def let_go(rt: Runtime, org_id: str, operation: str, key: str, claimed_at: datetime) -> None:
    """Make our claim stale at once (it stays, so the worker's sweep still finishes the request if
    the client never retries): the same key may be run again now, not only after the stale time.
    Only our own claim: one another request took over since has another created_at."""
    await rt.pg.execute(
        """
        UPDATE idempotent_requests SET created_at = created_at - make_interval(secs => $5 + 1)
        WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3 AND state = 'in_progress' AND created_at = $4
        """,
        org_id,
        operation,
        key,
        claimed_at,
        rt.settings.idempotent_claim_stale_s,
    )


async def abandon(rt: Runtime, org_id: str, operation: str, key: str) -> None:
    """Forget a claimed key whose request changed nothing, so the same key may be tried again."""
    await rt.pg.execute(
        "DELETE FROM idempotent_requests WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3 AND state = 'in_progress'",
        org_id,
        operation,
        key,
    )
