"""The Vapi phone-number adapter against a stand-in for Vapi's API (httpx.MockTransport)."""

import json

import httpx
import pytest

from credit_engine.engine.telephony import FakeTelephony, ProviderError, VapiTelephony


def vapi_stub(status: int, body: object, seen: list[httpx.Request]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def test_buys_a_vapi_number_with_the_api_key_and_reads_the_answer() -> None:
    seen: list[httpx.Request] = []
    answer = {
        "id": "pn_123",
        "orgId": "o",
        "number": "+14155550123",
        "status": "active",
        "createdAt": "x",
        "updatedAt": "x",
    }
    adapter = VapiTelephony("secret-key", "https://api.vapi.test", client=vapi_stub(201, answer, seen))
    bought = await adapter.buy(area_code="415", idempotency_key="org/key")
    assert (bought.vapi_phone_number_id, bought.number, bought.status) == ("pn_123", "+14155550123", "active")
    (request,) = seen
    assert (request.method, str(request.url)) == ("POST", "https://api.vapi.test/phone-number")
    assert request.headers["authorization"] == "Bearer secret-key"
    # Bare: no assistantId, squadId or workflowId (Vapi would never send an assistant-request).
    assert json.loads(request.content) == {"provider": "vapi", "name": "org/key", "numberDesiredAreaCode": "415"}


@pytest.mark.parametrize(
    ("status", "body"), [(400, {"message": "area code unavailable"}), (500, {}), (201, {"no": "id"}), (201, [1])]
)
async def test_any_failure_is_a_provider_error(status: int, body: object) -> None:
    adapter = VapiTelephony("k", "https://api.vapi.test", client=vapi_stub(status, body, []))
    with pytest.raises(ProviderError):
        await adapter.buy(area_code=None, idempotency_key="k")


async def test_an_unreachable_vapi_is_a_provider_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    adapter = VapiTelephony(
        "k", "https://api.vapi.test", client=httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    )
    with pytest.raises(ProviderError, match="unreachable"):
        await adapter.buy(area_code=None, idempotency_key="k")


async def test_the_fake_provider_is_deterministic_per_key_and_fails_where_configured() -> None:
    fake = FakeTelephony(frozenset({"999"}))
    first = await fake.buy(area_code="212", idempotency_key="a")
    assert first == await fake.buy(area_code="212", idempotency_key="a")
    assert first != await fake.buy(area_code="212", idempotency_key="b")
    with pytest.raises(ProviderError):
        await fake.buy(area_code="999", idempotency_key="a")
