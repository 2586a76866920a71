"""Lua scripts under test on a real Redis and on fakeredis, through the engine's own loader.

fakeredis runs Lua 5.1 but is not Redis (cjson, sandbox, no INFO): every test here runs on both,
so fakeredis is a fast second opinion, never the only proof.
"""

import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import fakeredis
import pytest

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.keys import Keyspace
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.records import HoldRecord
from credit_engine.engine.restore import restore_orgs
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.scripts import ScriptRunner
from credit_engine.engine.snapshots import OrgSnapshot
from tests.conftest import connect_any, delete_prefix
from tests.services import Services


@pytest.fixture(params=["redis", "fakeredis"])
async def redis_rt(request: pytest.FixtureRequest, services: Services) -> AsyncIterator[Runtime]:
    """A Runtime with Redis only (no Postgres): enough for every Redis-first operation."""
    prefix = f"t{secrets.token_hex(5)}"
    if request.param == "redis":
        redis = await connect_any(services.redis_url)
    else:
        redis = fakeredis.aioredis.FakeRedis(decode_responses=True)
    scripts = ScriptRunner()
    await scripts.load(redis)
    settings = replace(Settings(), key_prefix=prefix)
    rt = Runtime(settings=settings, redis=redis, pg=None, keys=Keyspace(prefix), scripts=scripts, clock=ManualClock())  # type: ignore[arg-type]
    yield rt
    await redis.aclose()
    if request.param == "redis":
        await delete_prefix(services.redis_url, prefix)


async def seed_org(
    rt: Runtime,
    balance_pence: int,
    *,
    debt_pence: int = 0,
    holds: dict[str, HoldRecord] | None = None,
    **settings: Any,
) -> str:
    """Put an org into Redis with org_restore.lua (itself under test here)."""
    org_id = f"org-{secrets.token_hex(4)}"
    settings.setdefault("rate_pence_per_minute", 60)
    snapshot = OrgSnapshot(
        org_id=org_id,
        name=org_id,
        settings=OrgSettings(**settings),
        balance_pence=balance_pence,
        debt_pence=debt_pence,
        last_entry_id=None,
        live_holds=holds or {},
        idem=[],
        pending_credit_keys=frozenset(),
    )
    assert (await restore_orgs(rt, [snapshot], "absent"))[org_id] == Outcome.ok
    return org_id


async def outbox(rt: Runtime, org_id: str) -> list[dict[str, str]]:
    """The org's ledger entries and hold events (alerts are tested on their own: see alerts())."""
    return [fields for _, fields in await rt.redis.xrange(rt.keys.org(org_id).outbox) if fields["t"] != "A"]


async def alerts(rt: Runtime, org_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in await rt.redis.xrange(rt.keys.org(org_id).outbox) if fields["t"] == "A"]
