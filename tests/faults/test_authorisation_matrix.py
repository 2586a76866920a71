"""The authorisation matrix, driven by the app's own route table (a new route that is not
classified here fails the test): every admin, org and webhook endpoint tried with every wrong
credential, and every org endpoint with another org's key. Nothing is read or moved."""

import time

import pytest

from credit_engine.webapp.app import ROUTES
from tests.webapp.conftest import ADMIN_TOKEN, WEBHOOK_SECRET, Api, api, app_settings  # noqa: F401 - fixtures
from tests.webapp.test_auth import signed
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet
from tests.webapp.vapi_payloads import assistant_request, call

pytestmark = pytest.mark.faults

PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json"}


def kind(path: str) -> str:
    if path in PUBLIC:
        return "public"
    if path.startswith("/api/admin/"):
        return "admin"
    if path.startswith("/api/vapi/"):
        return "vapi"
    if path == "/api/calls" or path.startswith(
        ("/api/wallet", "/api/calls/", "/api/alerts", "/api/forwarding/", "/api/managed-telephony/")
    ):
        return "org"
    raise AssertionError(f"{path}: classify this new route in the authorisation matrix")


def body_for(path: str, victim: str) -> object:
    return {
        "/api/admin/orgs": {"org_id": "intruder-org", "name": "x", "rate_pence_per_minute": 1},
        "/api/admin/orgs/{org_id}": {"rate_pence_per_minute": 1},
        "/api/admin/orgs/{org_id}/topups": {"amount_pence": 100_000},
        "/api/admin/phone-numbers": {
            "vapi_phone_number_id": "pn-intruder",
            "org_id": victim,
            "number": "+15550000000",
            "assistant_id": "a",
        },
        "/api/managed-telephony/provision": {"area_code": "415"},
        "/api/vapi/webhook/status-check": {"call_id": "v-call"},
    }.get(path)


async def test_every_route_refuses_every_wrong_credential_and_nothing_moves(api: Api) -> None:
    victim, victim_key = await api.new_org(5_000)
    attacker, attacker_key = await api.new_org(5_000)
    number = await api.register_number(victim)
    spare = (await api.admin("POST", f"/api/admin/orgs/{victim}/api-keys")).json()
    assert (await api.admin("DELETE", f"/api/admin/orgs/{victim}/api-keys/{spare['key_id']}")).status_code == 204
    revoked_key = spare["api_key"]
    assert (await api.as_org(victim_key, "POST", "/api/calls/v-call/reserve")).status_code == 201
    before = await wallet(api, victim_key)
    fill = {"org_id": victim, "call_id": "v-call", "key_id": spare["key_id"]}
    wrong_bearers = {
        "admin": [None, "wrong", victim_key, attacker_key, revoked_key, WEBHOOK_SECRET],
        "org": [None, "wrong", ADMIN_TOKEN, WEBHOOK_SECRET, revoked_key, "ce_live_" + "x" * 40],
    }
    webhook_body = assistant_request(call("intruder-call", phone_number_id=number))
    stale = str(int(time.time()) - 3_600)
    wrong_vapi = [
        {},
        {"X-Vapi-Secret": "wrong"},
        {"X-Vapi-Secret": WEBHOOK_SECRET[:-1]},
        {"Authorization": f"Bearer {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {victim_key}"},
        signed(webhook_body, stale),
        signed(webhook_body, str(int(time.time())), "x" * 40),
    ]
    tried = 0
    for route in ROUTES:
        path_kind = kind(route.path)
        path = route.path.format(**fill)
        for method in route.methods or ():
            if method == "HEAD" or path_kind == "public":
                continue
            body = body_for(route.path, victim)
            if path_kind == "vapi":
                for headers in wrong_vapi:
                    content = webhook_body if route.path == "/api/vapi/webhook" else b'{"call_id": "v-call"}'
                    answer = await api.client.request(
                        method, path, content=content, headers={"content-type": "application/json", **headers}
                    )
                    assert answer.status_code == 401, (method, path, headers)
                    tried += 1
                continue
            for bearer in wrong_bearers[path_kind]:
                headers = {"Idempotency-Key": "intruder"} | ({"Authorization": f"Bearer {bearer}"} if bearer else {})
                answer = await api.client.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (method, path, bearer)
                assert answer.json()["error"]["code"] and "WWW-Authenticate" in answer.headers
                tried += 1
    assert tried > 100
    # Another org's valid key: it sees only itself, and cannot reach the victim's call.
    assert (await api.as_org(attacker_key, "GET", "/api/calls/v-call")).status_code == 404
    assert (await wallet(api, attacker_key))["balance_pence"] == 5_000
    assert (await api.as_org(attacker_key, "GET", "/api/wallet/holds")).json()["items"] == []
    assert {
        i["amount_pence"] for i in (await api.as_org(attacker_key, "GET", "/api/wallet/transactions")).json()["items"]
    } == {5_000}
    assert (await api.as_org(attacker_key, "GET", "/api/alerts")).status_code in (200, 404)
    # Nothing of the victim's moved.
    assert await wallet(api, victim_key) == before
    assert await ledger_kinds(api, victim) == [("topup", 5_000)]
    assert await ledger_kinds(api, attacker) == [("topup", 5_000)]
