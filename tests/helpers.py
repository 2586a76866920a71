"""Small builders shared by the tests."""

import secrets
from typing import Any

from engine.credits import credit
from engine.org_settings import OrgSettings
from engine.orgs import create_org
from engine.runtime import Runtime


async def new_org(rt: Runtime, balance_pence: int = 0, *, rate_pence_per_minute: int = 60, **settings: Any) -> str:
    """An org in Postgres and Redis, topped up to `balance_pence` through the real credit path."""
    org_id = f"org-{secrets.token_hex(4)}"
    await create_org(rt, org_id, f"Org {org_id}", OrgSettings(rate_pence_per_minute=rate_pence_per_minute, **settings))
    if balance_pence > 0:
        topup = await credit(rt, org_id, f"seed-{org_id}", balance_pence)
        assert topup.applied
    return org_id
