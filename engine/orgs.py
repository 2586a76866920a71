"""Orgs (tenants): created and changed in Postgres first, then copied into Redis.

If the Redis step fails (Redis down), the org exists in Postgres only: scripts answer
org_unknown for it, and `restore_org_if_absent` (called by the web app on that answer, and by
the reconciler) brings it in. Postgres is the source of truth for an org's settings.
"""

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from credit_engine.engine import org_setting_table as table
from credit_engine.engine import validate
from credit_engine.engine.errors import InvalidInput, OrgExists, OrgNotFound
from credit_engine.engine.org_settings import URL_SETTINGS, OrgSettings, check_url_addresses
from credit_engine.engine.restore import restore_org_if_absent
from credit_engine.engine.results import Outcome, decode
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.snapshots import settings_from_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Org:
    org_id: str
    name: str
    settings: OrgSettings
    created_at: datetime
    updated_at: datetime


def _org_from_row(row: asyncpg.Record) -> Org:
    return Org(row["org_id"], row["name"], settings_from_row(row), row["created_at"], row["updated_at"])


def _settings_columns(settings: OrgSettings) -> list[Any]:
    """The orgs table's settings columns, in the table's order (SETTINGS_COLUMNS)."""
    return [getattr(settings, name) for name in table.NAMES]


SETTINGS_COLUMNS = ", ".join(table.NAMES)
INSERT_SQL = f"""
INSERT INTO orgs (org_id, name, {SETTINGS_COLUMNS})
VALUES ({", ".join(f"${i}" for i in range(1, len(table.NAMES) + 3))})
ON CONFLICT (org_id) DO NOTHING
RETURNING *
"""
UPDATE_SQL = f"""
UPDATE orgs SET name = $2, {", ".join(f"{name} = ${i}" for i, name in enumerate(table.NAMES, start=3))}, updated_at = now()
WHERE org_id = $1
RETURNING *
"""


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 200 or not name.isprintable():
        raise InvalidInput("name", "must be 1-200 printable characters")
    return name.strip()


async def create_org(rt: Runtime, org_id: str, name: str, settings: OrgSettings) -> Org:
    validate.org_id(org_id)
    name = _check_name(name)
    settings = settings.validated()
    await check_url_addresses(settings, URL_SETTINGS, allow_private=rt.settings.outbound_allow_private)
    async with rt.pg.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            INSERT_SQL,
            org_id,
            name,
            *_settings_columns(settings),
        )
        if row is None:
            raise OrgExists(org_id)
        await conn.execute("INSERT INTO org_balances (org_id) VALUES ($1)", org_id)
    rt.profiles.forget(org_id)  # a profile read while the org did not exist (the defaults)
    try:
        await restore_org_if_absent(rt, org_id)
    except RedisError:
        log.warning("org %s created in postgres; redis unavailable, it will be restored on first use", org_id)
    return _org_from_row(row)


async def get_org(rt: Runtime, org_id: str) -> Org:
    validate.org_id(org_id)
    row = await rt.pg.fetchrow("SELECT * FROM orgs WHERE org_id = $1", org_id)
    if row is None:
        raise OrgNotFound(org_id)
    return _org_from_row(row)


async def org_exists(rt: Runtime, org_id: str) -> bool:
    return bool(await rt.pg.fetchval("SELECT EXISTS (SELECT 1 FROM orgs WHERE org_id = $1)", org_id))


async def update_org(rt: Runtime, org_id: str, changes: dict[str, Any]) -> Org:
    """Change settings (and/or name): Postgres first, then the org's Redis hash."""
    current = await get_org(rt, org_id)
    name = _check_name(changes.pop("name")) if "name" in changes else current.name
    settings = current.settings.changed(changes)
    changed_urls = tuple(url_setting for url_setting in URL_SETTINGS if url_setting in changes)
    await check_url_addresses(settings, changed_urls, allow_private=rt.settings.outbound_allow_private)
    row = await rt.pg.fetchrow(
        UPDATE_SQL,
        org_id,
        name,
        *_settings_columns(settings),
    )
    if row is None:
        raise OrgNotFound(org_id)
    rt.profiles.forget(org_id)  # this process speaks the new sentences at once; others within the cache's TTL
    try:
        await configure_redis(rt, org_id, settings)
    except RedisError:
        log.warning("org %s settings saved in postgres; redis unavailable, `reconcile --repair` will copy them", org_id)
    return _org_from_row(row)


async def configure_redis(rt: Runtime, org_id: str, settings: OrgSettings) -> Outcome:
    keys = rt.keys.org(org_id)
    reply = await rt.scripts.run(
        rt.redis, "org_configure", [keys.org], [rt.clock.script_arg(), org_id, *settings.script_args()]
    )
    outcome = decode(reply, tail_length=0).outcome
    if outcome == Outcome.org_unknown:
        # Not in Redis: restoring from Postgres brings the new settings with it.
        await restore_org_if_absent(rt, org_id)
        return Outcome.ok
    return outcome
