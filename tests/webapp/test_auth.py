"""Who may do what: webhook secrets and HMAC, the admin token, org keys (hashed, isolated, revocable)."""

import hashlib
import hmac
import time

import pytest

from credit_engine.engine.api_keys import key_sha256
from credit_engine.engine.runtime import Runtime
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api
from tests.webapp.test_seed_scenarios import wallet
from tests.webapp.vapi_payloads import assistant_request, call


async def held(api: Api, key: str) -> int:
    return (await wallet(api, key))["held_pence"]


def signed(body: bytes, timestamp: str, secret: str = WEBHOOK_SECRET, prefix: str = "") -> dict[str, str]:
    signature = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"x-signature": prefix + signature, "x-timestamp": timestamp, "content-type": "application/json"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Vapi-Secret": "wrong"},
        {"X-Vapi-Secret": WEBHOOK_SECRET[:-1]},
        {"Authorization": "Bearer wrong"},
        {"Authorization": WEBHOOK_SECRET},  # not a bearer
        {"Authorization": f"Bearer {ADMIN_TOKEN}"},  # the admin token is not the webhook secret
    ],
)
async def test_a_webhook_without_the_secret_is_refused_and_changes_nothing(api: Api, headers: dict[str, str]) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    body = assistant_request(call("c1", phone_number_id=number))
    for path in ("/api/vapi/webhook", "/api/vapi/webhook/status-check"):
        answer = await api.client.post(path, content=body, headers={"content-type": "application/json", **headers})
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
    assert await held(api, key) == 0


async def test_the_secret_works_as_x_vapi_secret_or_as_a_bearer_token(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    for i, headers in enumerate(({"X-Vapi-Secret": WEBHOOK_SECRET}, {"Authorization": f"Bearer {WEBHOOK_SECRET}"})):
        answer = await api.client.post(
            "/api/vapi/webhook", content=assistant_request(call(f"c{i}", phone_number_id=number)), headers=headers
        )
        assert "assistantId" in answer.json()
    assert await held(api, key) == 600


@pytest.mark.parametrize("unit", ["seconds", "milliseconds"])
async def test_a_fresh_hmac_signature_over_the_raw_body_is_accepted(api: Api, unit: str) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    body = assistant_request(call("c1", phone_number_id=number))
    stamp = str(int(time.time())) if unit == "seconds" else str(int(time.time() * 1000))
    answer = await api.client.post("/api/vapi/webhook", content=body, headers=signed(body, stamp, prefix="sha256="))
    assert "assistantId" in answer.json()
    assert await held(api, key) == 300


async def test_hmac_refused_when_stale_forged_or_over_another_body(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    body = assistant_request(call("c1", phone_number_id=number))
    now = int(time.time())
    stale = signed(body, str(now - 301))
    future = signed(body, str(now + 301))
    forged = signed(body, str(now), secret="not-the-secret")
    other_body = signed(b'{"message":{"type":"hang"}}', str(now))
    garbage_stamp = signed(body, "yesterday")
    for headers in (stale, future, forged, other_body, garbage_stamp):
        answer = await api.client.post("/api/vapi/webhook", content=body, headers=headers)
        assert answer.status_code == 401
    assert await held(api, key) == 0


async def test_admin_endpoints_need_the_admin_token(api: Api) -> None:
    org, key = await api.new_org(100)
    attempts = [
        ("POST", "/api/admin/orgs", {"org_id": "x1", "name": "x", "rate_pence_per_minute": 1}),
        ("GET", f"/api/admin/orgs/{org}", None),
        ("PATCH", f"/api/admin/orgs/{org}", {"rate_pence_per_minute": 1}),
        ("POST", f"/api/admin/orgs/{org}/api-keys", None),
        ("POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 100}),
        ("POST", "/api/admin/phone-numbers", {"vapi_phone_number_id": "pn", "org_id": org}),
    ]
    for token in (None, "wrong", key, WEBHOOK_SECRET):  # an org's key is not the admin token
        headers = {"Idempotency-Key": "k"} | ({"Authorization": f"Bearer {token}"} if token else {})
        for method, path, body in attempts:
            answer = await api.client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (token, method, path)
    assert (await wallet(api, key))["balance_pence"] == 100


async def test_org_endpoints_need_an_org_key_and_refuse_the_admin_token(api: Api) -> None:
    paths = [
        ("GET", "/api/wallet"),
        ("GET", "/api/wallet/transactions"),
        ("GET", "/api/wallet/holds"),
        ("GET", "/api/calls/c1"),
        ("POST", "/api/calls/c1/reserve"),
        ("GET", "/api/managed-telephony/pricing"),
        ("POST", "/api/managed-telephony/provision"),
    ]
    for token in (None, ADMIN_TOKEN, WEBHOOK_SECRET, "ce_live_made-up"):
        headers = {"Idempotency-Key": "k"} | ({"Authorization": f"Bearer {token}"} if token else {})
        for method, path in paths:
            answer = await api.client.request(method, path, headers=headers)
            assert answer.status_code == 401, (token, path)


async def test_one_orgs_key_never_sees_or_moves_another_orgs_money(api: Api) -> None:
    org_a, key_a = await api.new_org(1000)
    org_b, key_b = await api.new_org(5000)
    reserved = await api.as_org(key_b, "POST", "/api/calls/b-call/reserve")
    assert reserved.status_code == 201
    assert (await api.as_org(key_a, "GET", "/api/calls/b-call")).status_code == 404
    assert (await wallet(api, key_a))["balance_pence"] == 1000
    assert (await api.as_org(key_a, "GET", "/api/wallet/holds")).json()["items"] == []
    items_a = (await api.as_org(key_a, "GET", "/api/wallet/transactions")).json()["items"]
    assert {i["amount_pence"] for i in items_a} == {1000}
    # A's reserve of B's call id is refused: the call is B's, and neither org's money moves.
    taken = await api.as_org(key_a, "POST", "/api/calls/b-call/reserve")
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "call_taken")
    assert (await wallet(api, key_b))["held_pence"] == 300
    assert (await wallet(api, key_a))["held_pence"] == 0


async def test_keys_are_stored_hashed_and_a_revoked_key_stops_working(api: Api) -> None:
    org, key = await api.new_org(100)
    issued = (await api.admin("POST", f"/api/admin/orgs/{org}/api-keys")).json()
    assert (await api.as_org(issued["api_key"], "GET", "/api/wallet")).status_code == 200
    rt = await Runtime.open(api.settings)
    try:
        stored = await rt.pg.fetch("SELECT key_sha256 FROM api_keys WHERE org_id = $1", org)
        everything = str(await rt.pg.fetch("SELECT * FROM api_keys"))
    finally:
        await rt.close()
    assert key_sha256(issued["api_key"]) in {bytes(row["key_sha256"]) for row in stored}
    assert issued["api_key"] not in everything and key not in everything
    revoked = await api.admin("DELETE", f"/api/admin/orgs/{org}/api-keys/{issued['key_id']}")
    assert revoked.status_code == 204
    assert (await api.as_org(issued["api_key"], "GET", "/api/wallet")).status_code == 401
    assert (await api.as_org(key, "GET", "/api/wallet")).status_code == 200  # the other key still works
    assert (await api.admin("DELETE", f"/api/admin/orgs/{org}/api-keys/{issued['key_id']}")).status_code == 404


async def test_a_non_finite_hmac_timestamp_is_refused(api: Api) -> None:
    org, key = await api.new_org(1000)
    number = await api.register_number(org)
    body = assistant_request(call("c1", phone_number_id=number))
    for stamp in ("nan", "inf", "-inf"):
        answer = await api.client.post("/api/vapi/webhook", content=body, headers=signed(body, stamp))
        assert answer.status_code == 401, stamp
    assert await held(api, key) == 0
