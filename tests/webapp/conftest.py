"""The web app in-process over HTTP (httpx + ASGI, with its real lifespan), against real Redis and
Postgres; tests/webapp/test_server.py runs it as a real uvicorn server too."""

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.webapp.app import create_app

ADMIN_TOKEN = "admin-" + "a" * 40
WEBHOOK_SECRET = "vapi-secret-" + "b" * 40


@dataclass
class Api:
    client: httpx.AsyncClient
    settings: Settings

    async def admin(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.request(
            method, path, json=json, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **(headers or {})}
        )

    async def as_org(
        self, key: str, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.request(
            method, path, json=json, headers={"Authorization": f"Bearer {key}", **(headers or {})}
        )

    async def vapi(self, body: bytes, path: str = "/api/vapi/webhook") -> httpx.Response:
        return await self.client.post(
            path, content=body, headers={"X-Vapi-Secret": WEBHOOK_SECRET, "Content-Type": "application/json"}
        )

    async def status_check(self, call_id: str) -> httpx.Response:
        return await self.client.post(
            "/api/vapi/webhook/status-check", json={"call_id": call_id}, headers={"X-Vapi-Secret": WEBHOOK_SECRET}
        )

    async def new_org(self, balance_pence: int = 0, **settings: Any) -> tuple[str, str]:
        """(org_id, api_key) of a new org topped up to balance_pence."""
        org_id = f"org-{secrets.token_hex(4)}"
        created = await self.admin(
            "POST", "/api/admin/orgs", {"org_id": org_id, "name": "Test Org", "rate_pence_per_minute": 60, **settings}
        )
        assert created.status_code == 201, created.text
        key = (await self.admin("POST", f"/api/admin/orgs/{org_id}/api-keys")).json()["api_key"]
        if balance_pence:
            topped = await self.admin(
                "POST",
                f"/api/admin/orgs/{org_id}/topups",
                {"amount_pence": balance_pence},
                headers={"Idempotency-Key": f"seed-{org_id}"},
            )
            assert topped.status_code == 201, topped.text
        return org_id, key

    async def register_number(self, org_id: str, number_id: str | None = None, assistant_id: str = "asst-1") -> str:
        number_id = number_id or f"pn-{secrets.token_hex(4)}"
        registered = await self.admin(
            "POST",
            "/api/admin/phone-numbers",
            {
                "vapi_phone_number_id": number_id,
                "org_id": org_id,
                "number": "+15550001111",
                "assistant_id": assistant_id,
            },
        )
        assert registered.status_code == 201, registered.text
        return number_id


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=ADMIN_TOKEN, vapi_webhook_secret=WEBHOOK_SECRET)


@pytest.fixture
async def api(app_settings: Settings, clock: ManualClock) -> AsyncIterator[Api]:
    app = create_app(app_settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credit-engine.test") as client:
            yield Api(client, app_settings)
    from tests.conftest import delete_prefix

    assert app_settings.redis_url is not None
    await delete_prefix(app_settings.redis_url, app_settings.key_prefix)
