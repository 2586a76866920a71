"""Where phone numbers are bought: Vapi's `POST /phone-number`, or a fake for local use and tests.

The fake is the default when no VAPI_API_KEY is configured. It is deterministic per idempotency
key (a retried purchase gets the same number) and has no numbers in the area codes listed in
CREDIT_ENGINE_FAKE_PROVIDER_FAILING_AREA_CODES (default 999), which is how the refund path is
exercised without a real outage.
"""

import hashlib
from dataclasses import dataclass
from typing import Protocol

import httpx

from credit_engine.engine.config import Settings

provider_timeout_s = 10.0


@dataclass(frozen=True)
class BoughtNumber:
    vapi_phone_number_id: str
    number: str | None
    status: str


class ProviderError(RuntimeError):
    """The provider did not sell us a number; nothing was bought."""


class Telephony(Protocol):
    name: str

    async def buy(self, *, area_code: str | None, idempotency_key: str) -> BoughtNumber:
        """Buy a bare number (no assistant attached at the provider: see engine/provisioning.py)."""
        ...

    async def release(self, vapi_phone_number_id: str) -> None:
        """Give the number back to the provider (it stops costing us); a number already gone is fine."""
        ...


class FakeTelephony:
    name = "fake"

    def __init__(self, failing_area_codes: frozenset[str] = frozenset({"999"})) -> None:
        self.failing_area_codes = failing_area_codes
        self.released: list[str] = []

    async def release(self, vapi_phone_number_id: str) -> None:
        self.released.append(vapi_phone_number_id)

    async def buy(self, *, area_code: str | None, idempotency_key: str) -> BoughtNumber:
        if area_code in self.failing_area_codes:
            raise ProviderError(f"no numbers available in area code {area_code}")
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        line = int(digest[:8], 16) % 10_000
        return BoughtNumber(f"fake-{digest[:24]}", f"+1{area_code or '415'}555{line:04d}", "active")


class VapiTelephony:
    """Vapi's own numbers (provider "vapi"): free US numbers, up to Vapi's per-account limit."""

    name = "vapi"

    def __init__(self, api_key: str, base_url: str, client: httpx.AsyncClient | None = None) -> None:
        self.api_key = api_key
        self.base_url = base_url
        self.client = client or httpx.AsyncClient(timeout=provider_timeout_s)

    async def buy(self, *, area_code: str | None, idempotency_key: str) -> BoughtNumber:
        # No assistantId, squadId or workflowId: a bare number, so every inbound call to it sends
        # an assistant-request and passes the credit check.
        body: dict[str, str] = {"provider": "vapi", "name": idempotency_key[:40]}
        if area_code:
            body["numberDesiredAreaCode"] = area_code
        try:
            response = await self.client.post(
                f"{self.base_url}/phone-number", json=body, headers={"Authorization": f"Bearer {self.api_key}"}
            )
        except httpx.HTTPError as error:
            raise ProviderError(f"vapi unreachable: {type(error).__name__}") from error
        if response.status_code not in (200, 201):
            raise ProviderError(f"vapi answered {response.status_code}")
        try:
            payload = response.json()
        except ValueError:
            raise ProviderError("vapi answered with a body that is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
            raise ProviderError("vapi answered without a phone number id")
        return BoughtNumber(payload["id"], payload.get("number"), str(payload.get("status", "active")))

    async def release(self, vapi_phone_number_id: str) -> None:
        try:
            response = await self.client.delete(
                f"{self.base_url}/phone-number/{vapi_phone_number_id}",
                headers={"Authorization": f"Bearer {self.api_key}"},
            )
        except httpx.HTTPError as error:
            raise ProviderError(f"vapi unreachable: {type(error).__name__}") from error
        if response.status_code not in (200, 204, 404):  # 404: already released
            raise ProviderError(f"vapi answered {response.status_code}")

    async def close(self) -> None:
        await self.client.aclose()


def make_telephony(settings: Settings) -> Telephony:
    if settings.vapi_api_key:
        return VapiTelephony(settings.vapi_api_key, settings.vapi_base_url)
    return FakeTelephony(settings.fake_provider_failing_area_codes)
