"""Phone numbers registered to orgs: how a Vapi webhook finds its tenant.

Postgres-first (phone_numbers), with a read-through copy in one Redis hash so that an
assistant-request or status-check finds the org without touching Postgres. The reconciler's
rebuild does not need to restore it: a miss falls back to Postgres and fills the copy.
"""

from dataclasses import dataclass

import asyncpg

from credit_engine.engine import validate
from credit_engine.engine.errors import InvalidInput, OrgNotFound
from credit_engine.engine.replies import asyncio_reply
from credit_engine.engine.runtime import Runtime

PHONE_NUMBER_ID_MAX = 128


@dataclass(frozen=True)
class PhoneNumber:
    vapi_phone_number_id: str
    org_id: str
    number: str | None
    assistant_id: str | None
    status: str
    provider: str


class NumberTaken(ValueError):
    def __init__(self, vapi_phone_number_id: str) -> None:
        super().__init__(f"phone number {vapi_phone_number_id!r} is registered to another org")


def _owner_key(rt: Runtime) -> str:
    return f"{rt.keys.prefix}:numbers"


def _from_row(row: asyncpg.Record) -> PhoneNumber:
    return PhoneNumber(
        row["vapi_phone_number_id"], row["org_id"], row["number"], row["assistant_id"], row["status"], row["provider"]
    )


def check_phone_number_id(value: object, field: str = "vapi_phone_number_id") -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= PHONE_NUMBER_ID_MAX or not value.isprintable():
        raise InvalidInput(field, f"must be 1-{PHONE_NUMBER_ID_MAX} printable characters")
    return value


async def register_number(
    rt: Runtime,
    org_id: str,
    vapi_phone_number_id: str,
    *,
    number: str | None,
    assistant_id: str | None,
    provider: str,
    provision_key: str | None = None,
    status: str = "active",
) -> PhoneNumber:
    """Register (or re-register, for the same org) a number. Another org's number is refused."""
    validate.org_id(org_id)
    check_phone_number_id(vapi_phone_number_id)
    try:
        row = await rt.pg.fetchrow(
            """
            INSERT INTO phone_numbers (vapi_phone_number_id, org_id, number, assistant_id, provider, provision_key, status)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (vapi_phone_number_id) DO UPDATE
                SET number = EXCLUDED.number, assistant_id = EXCLUDED.assistant_id, status = EXCLUDED.status
                WHERE phone_numbers.org_id = EXCLUDED.org_id
            RETURNING *
            """,
            vapi_phone_number_id,
            org_id,
            number,
            assistant_id,
            provider,
            provision_key,
            status,
        )
    except asyncpg.ForeignKeyViolationError:
        raise OrgNotFound(org_id) from None
    if row is None:
        raise NumberTaken(vapi_phone_number_id)
    registered = _from_row(row)
    await asyncio_reply(rt.redis.hset(_owner_key(rt), vapi_phone_number_id, f"{org_id}|{assistant_id or ''}"))
    return registered


async def forget_owner(rt: Runtime, *vapi_phone_number_ids: str) -> None:
    """Drop numbers from the owner cache (suspended or released: calls to them are refused)."""
    if vapi_phone_number_ids:
        await asyncio_reply(rt.redis.hdel(_owner_key(rt), *vapi_phone_number_ids))


@dataclass(frozen=True)
class Owner:
    org_id: str
    assistant_id: str | None
    active: bool  # False: suspended or released; its calls are still its owner's, new ones are refused


async def number_owner(rt: Runtime, vapi_phone_number_id: str, *, active_only: bool = True) -> Owner | None:
    """The org a registered number belongs to, from Redis, else Postgres; None if unknown. The
    cache holds active numbers only; active_only=False (a call already running) also finds a
    suspended or released number's owner."""
    cached = await asyncio_reply(rt.redis.hget(_owner_key(rt), vapi_phone_number_id))
    if cached is not None:
        org_id, _, assistant_id = cached.partition("|")
        return Owner(org_id, assistant_id or None, active=True)
    row = await rt.pg.fetchrow(
        "SELECT org_id, assistant_id, status FROM phone_numbers WHERE vapi_phone_number_id = $1", vapi_phone_number_id
    )
    if row is None or (active_only and row["status"] != "active"):
        return None
    if row["status"] == "active":
        await asyncio_reply(
            rt.redis.hset(_owner_key(rt), vapi_phone_number_id, f"{row['org_id']}|{row['assistant_id'] or ''}")
        )
    return Owner(row["org_id"], row["assistant_id"], active=row["status"] == "active")


async def number_for_provision_key(rt: Runtime, org_id: str, provision_key: str) -> PhoneNumber | None:
    row = await rt.pg.fetchrow(
        "SELECT * FROM phone_numbers WHERE org_id = $1 AND provision_key = $2", org_id, provision_key
    )
    return _from_row(row) if row is not None else None


async def registered_numbers(rt: Runtime, org_id: str | None = None) -> list[PhoneNumber]:
    """Every registered number (of one org, if given), released ones included, by id."""
    rows = await rt.pg.fetch(
        "SELECT * FROM phone_numbers WHERE $1::text IS NULL OR org_id = $1 ORDER BY vapi_phone_number_id", org_id
    )
    return [_from_row(row) for row in rows]


async def import_number(
    rt: Runtime, org_id: str, vapi_phone_number_id: str, *, number: str | None, assistant_id: str | None, provider: str
) -> PhoneNumber | None:
    """Register a number found on the platform's Vapi account (`credit-engine vapi import`), only if
    nobody registered it yet: None when it is registered already (to this org or another), which
    is left exactly as it is (its assistant, and a suspension for unpaid rent, are kept)."""
    validate.org_id(org_id)
    check_phone_number_id(vapi_phone_number_id)
    try:
        row = await rt.pg.fetchrow(
            """
            INSERT INTO phone_numbers (vapi_phone_number_id, org_id, number, assistant_id, provider, status)
            VALUES ($1, $2, $3, $4, $5, 'active')
            ON CONFLICT (vapi_phone_number_id) DO NOTHING
            RETURNING *
            """,
            vapi_phone_number_id,
            org_id,
            number,
            assistant_id,
            provider,
        )
    except asyncpg.ForeignKeyViolationError:
        raise OrgNotFound(org_id) from None
    if row is None:
        return None
    await asyncio_reply(rt.redis.hset(_owner_key(rt), vapi_phone_number_id, f"{org_id}|{assistant_id or ''}"))
    return _from_row(row)


async def adopt_assistant(rt: Runtime, vapi_phone_number_id: str, assistant_id: str) -> bool:
    """Record the assistant a number had at Vapi as the one the engine answers, if it has none
    yet (`credit-engine vapi connect`, before the number is made bare). False: it had one."""
    row = await rt.pg.fetchrow(
        """UPDATE phone_numbers SET assistant_id = $2 WHERE vapi_phone_number_id = $1 AND assistant_id IS NULL
           RETURNING org_id, status""",
        vapi_phone_number_id,
        assistant_id,
    )
    if row is None:
        return False
    if row["status"] == "active":
        await asyncio_reply(rt.redis.hset(_owner_key(rt), vapi_phone_number_id, f"{row['org_id']}|{assistant_id}"))
    return True
