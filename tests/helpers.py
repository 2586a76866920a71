"""Small builders shared by the tests."""

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from credit_engine.engine.config import Settings
from credit_engine.engine.credits import credit
from credit_engine.engine.org_settings import OrgSettings
from credit_engine.engine.orgs import create_org
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp.app import create_app
from tests.served import served


async def new_org(rt: Runtime, balance_pence: int = 0, *, rate_pence_per_minute: int = 60, **settings: Any) -> str:
    """An org in Postgres and Redis, topped up to `balance_pence` through the real credit path."""
    org_id = f"org-{secrets.token_hex(4)}"
    await create_org(rt, org_id, f"Org {org_id}", OrgSettings(rate_pence_per_minute=rate_pence_per_minute, **settings))
    if balance_pence > 0:
        topup = await credit(rt, org_id, f"seed-{org_id}", balance_pence)
        assert topup.applied
    return org_id


async def assert_books_agree(rt: Runtime, org_id: str) -> int:
    """Drain the org, then: the ledger's sum = the Postgres projection = Redis's balance (and the
    same for debt), no entry refused by the ledger, and `reconcile --check` clean. Returns the balance."""
    from credit_engine.engine.balances import read_wallet
    from credit_engine.engine.outbox import drain_org_fully
    from credit_engine.engine.reconciler import check

    await drain_org_fully(rt, org_id)
    row = await rt.pg.fetchrow(
        """SELECT b.balance_pence, b.debt_pence,
                  (SELECT coalesce(sum(amount_pence), 0) FROM ledger_entries WHERE org_id = $1) AS amounts,
                  (SELECT coalesce(sum(debt_delta_pence), 0) FROM ledger_entries WHERE org_id = $1) AS debts,
                  (SELECT count(*) FROM ledger_rejects WHERE org_id = $1) AS rejects
           FROM org_balances b WHERE b.org_id = $1""",
        org_id,
    )
    wallet = await read_wallet(rt, org_id)
    assert wallet is not None
    assert row["amounts"] == row["balance_pence"] == wallet.balance_pence, (dict(row), wallet)
    assert row["debts"] == row["debt_pence"] == wallet.debt_pence, (dict(row), wallet)
    assert row["rejects"] == 0
    report = await check(rt, [org_id])
    assert report.clean, report.drifted
    return int(wallet.balance_pence)


@asynccontextmanager
async def engine_served(settings: Settings, port: int) -> AsyncIterator[None]:
    """The engine's web app on a loopback port: its CREDIT_ENGINE_PUBLIC_URL answers."""
    async with served(create_app(settings), port, lifespan="on"):
        yield
