"""The first result of each (org, operation, Idempotency-Key), kept so replays get it back: the
first of the three idempotency layers (engine/idempotency.py names all three).

begin() claims a key: a new key is ours to run; a finished one is a replay of its stored
result; the same key with another request body is a conflict; a key another request is still
running is `in_progress` (unless that request has been silent longer than
CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S, 60 s by default: its process died, and the operation,
idempotent underneath, is run again).

once() is the one way an operation runs under a claim (top-ups, provisioning): claim, run,
then keep the result, or forget the claim, or let it go stale, by what the attempt did (Attempt).
What is kept is the engine's result record, not an HTTP answer: the web app maps it to HTTP in
one table (webapp/answers.py), the same way on the first answer and on every replay. Claims
finished by releases before that keep the HTTP answer they stored, replayed verbatim (`legacy`).
"""

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import orjson

from credit_engine.engine.runtime import Runtime


class Claim(Enum):
    new = "new"
    replay = "replay"
    conflict = "conflict"
    in_progress = "in_progress"


@dataclass(frozen=True)
class LegacyAnswer:
    """The HTTP answer a claim finished before release 0006 stored (replayed verbatim)."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claimed:
    claim: Claim
    result: dict[str, Any] | None = None  # replay: the first attempt's result record
    legacy: LegacyAnswer | None = None  # replay of a claim an older release finished
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
            SELECT request_sha256, state, result, response_status, response_body,
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
            return _replay(row)
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


def _replay(row: Any) -> Claimed:
    if row["result"] is not None:
        return Claimed(Claim.replay, result=row["result"])
    return Claimed(Claim.replay, legacy=LegacyAnswer(row["response_status"], row["response_body"]))


async def finish(rt: Runtime, org_id: str, operation: str, key: str, result: dict[str, Any]) -> None:
    """Keep the operation's result record: every later request with the key gets it back. The
    first result kept stays (one that took a stale claim over and finished first wins)."""
    await rt.pg.execute(
        """
        UPDATE idempotent_requests SET state = 'done', result = $4, completed_at = now()
        WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3 AND state = 'in_progress'
        """,
        org_id,
        operation,
        key,
        result,  # the pool's jsonb codec encodes the dict
    )


async def replace(rt: Runtime, org_id: str, operation: str, key: str, result: dict[str, Any]) -> None:
    """Replace a result kept before asking an outsider (finish()ed as "no answer" so that a retry
    never asks twice) with what the outsider answered."""
    await rt.pg.execute(
        """
        UPDATE idempotent_requests SET result = $4, completed_at = now()
        WHERE org_id = $1 AND operation = $2 AND idempotency_key = $3 AND state = 'done'
        """,
        org_id,
        operation,
        key,
        result,
    )


@dataclass
class Attempt:
    """What a claimed run has done so far; if it raises, this decides what becomes of its claim.

    - nothing changed, or nothing a rerun under another body could get wrong (a top-up's ledger
      key refuses another amount by itself): the claim is forgotten, and the key is free again;
    - `changed` (idempotent writes, e.g. a charge under the same key): the claim is made stale at
      once (let_go), so a retry may run it again now, and a sweep can still find and finish it;
    - `asked_outside` (a provider that may have acted, with no key of ours): the claim stays fresh
      for the stale time, so a slow first attempt is not doubled.
    """

    changed: bool = False
    asked_outside: bool = False


class Result(Protocol):
    """What a claimed operation returns: its outcome, whether its record is kept, and the record."""

    @property
    def outcome(self) -> Enum: ...

    def kept(self) -> bool: ...

    def record(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Result)


@dataclass(frozen=True)
class Once(Generic[R]):
    """A request run under its key: `result` is this run's (claim new) or the first run's (replay,
    decoded from its record); None when the key conflicts, is in progress, or is a legacy replay."""

    claim: Claim
    result: R | None = None
    legacy: LegacyAnswer | None = None


async def once(
    rt: Runtime,
    org_id: str,
    operation: str,
    key: str,
    request: dict[str, Any],
    run: Callable[[Attempt], Awaitable[R]],
    decode: Callable[[dict[str, Any]], R],
) -> Once[R]:
    """Claim the key for this request and run it, or answer from the first run (see settle)."""
    claimed = await begin(rt, org_id, operation, key, request)
    if claimed.claim == Claim.new:
        return Once(Claim.new, await settle(rt, org_id, operation, key, run, claimed.claimed_at))
    if claimed.result is not None:
        return Once(Claim.replay, decode(claimed.result))
    return Once(claimed.claim, legacy=claimed.legacy)


async def settle(
    rt: Runtime,
    org_id: str,
    operation: str,
    key: str,
    run: Callable[[Attempt], Awaitable[R]],
    claimed_at: datetime | None,
) -> R:
    """Run a claimed operation and settle its claim: keep a result that is `kept()`, forget one
    that is not (it changed nothing: the key may be used again); if it raises, as Attempt says.
    `claimed_at` None: the claim was taken over by a sweep, which leaves it for its next round."""
    attempt = Attempt()
    try:
        result = await run(attempt)
        if result.kept():
            await finish(rt, org_id, operation, key, result.record())
        else:
            await abandon(rt, org_id, operation, key)
    except Exception:
        if claimed_at is not None and not attempt.asked_outside:
            with contextlib.suppress(Exception):  # Postgres may be what failed; then the claim goes stale by itself
                await _release(rt, org_id, operation, key, claimed_at, attempt)
        raise
    return result


async def _release(rt: Runtime, org_id: str, operation: str, key: str, claimed_at: datetime, attempt: Attempt) -> None:
    """A claimed run failed (or its result could not be kept): free the key now, as Attempt says."""
    if attempt.changed:
        await let_go(rt, org_id, operation, key, claimed_at)
    else:
        await abandon(rt, org_id, operation, key)


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
