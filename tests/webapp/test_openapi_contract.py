"""The OpenAPI document against what the handlers really send (issue 14). Every documented operation
is called on the live app (real Redis and Postgres, its own lifespan) in a state where its answers
say something: an org with top-ups, calls live and billed, a ledger of several pages, numbers,
alerts, and the errors. Every response is recorded as it arrives and checked, by schemathesis's
own validation (the one its response_schema_conformance check runs), against the schema the
document gives its status code. The response schemas are closed (additionalProperties: false), so
a field a handler sends without documenting it fails here; a status code, or a body, the document
does not have fails too."""

import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.schemas import OpenApiSchema
from vapi.types import Call

from credit_engine.engine.config import Settings
from credit_engine.engine.idempotency import call_state_key
from credit_engine.engine.outbox import drain_org_fully
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp import dial as dial_endpoint
from credit_engine.webapp.app import ROUTES
from credit_engine.webapp.openapi import SCHEMAS, openapi_document
from tests.alert_receivers import add_alerts
from tests.fake_vapi_api import API_KEY, FakeVapiApi
from tests.webapp.conftest import ADMIN_TOKEN, Api
from tests.webapp.vapi_payloads import assistant_request, call, end_of_call_report, status_update

# The one response object left open, on purpose: Vapi's reply, which for a platform's messages is
# the platform's own answer relayed (webapp/openapi.py says why).
OPEN_BY_DESIGN = {"#/components/schemas/VapiReply"}
UNDOCUMENTED_ROUTES = {"/openapi.json"}  # the document itself


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Alerts signed and forwarding signed, so both secrets' endpoints answer 200."""
    return replace(settings, alert_signing_key="k" * 40, forward_secret="f" * 40)


METHODS = ("get", "post", "put", "patch", "delete")


def documented_answers() -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(path, METHOD, status, the documented answer) for every answer of every operation."""
    for path, item in openapi_document()["paths"].items():
        for method in METHODS:
            for status, answer in item.get(method, {}).get("responses", {}).items():
                yield path, method.upper(), status, answer


def documented_operations() -> set[tuple[str, str]]:
    return {(path, method) for path, method, _, _ in documented_answers()}


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = SCHEMAS[node["$ref"].removeprefix("#/components/schemas/")]
    return node


def open_objects(node: Any, where: str) -> Iterator[str]:
    """Every object schema under `node` that lets properties through undocumented."""
    if isinstance(node, dict) and "$ref" in node:
        if node["$ref"] not in OPEN_BY_DESIGN:
            yield from open_objects(resolve(node), node["$ref"])
        return
    if not isinstance(node, dict):
        return
    if (node.get("type") == "object" or "properties" in node) and node.get("additionalProperties") is not False:
        yield where
    for name, child in node.get("properties", {}).items():
        yield from open_objects(child, f"{where}/properties/{name}")
    yield from open_objects(node.get("items"), f"{where}/items")
    for keyword in ("oneOf", "anyOf", "allOf"):
        for n, child in enumerate(node.get(keyword, [])):
            yield from open_objects(child, f"{where}/{keyword}/{n}")


def test_every_response_object_is_closed_and_every_route_documented() -> None:
    found: list[str] = []
    for path, method, status, answer in documented_answers():
        for media_type, content in answer.get("content", {}).items():
            found += open_objects(content["schema"], f"{method} {path} {status} {media_type}")
    assert found == [], "response objects that allow undocumented fields"
    routes = {(route.path, method) for route in ROUTES for method in route.methods or () if method != "HEAD"}
    assert routes - {(path, "GET") for path in UNDOCUMENTED_ROUTES} == documented_operations()


@dataclass
class Recorded:
    operation: tuple[str, str]
    response: httpx.Response


@dataclass
class Contract:
    """Records every response the app sends, with the documented operation it answers."""

    schema: OpenApiSchema
    recorded: list[Recorded] = field(default_factory=list, repr=False)
    templates: list[tuple[re.Pattern[str], str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for path in openapi_document()["paths"]:
            self.templates.append((re.compile(re.sub(r"\{[a-z_]+\}", "[^/]+", path)), path))

    async def record(self, response: httpx.Response) -> None:
        await response.aread()
        url_path = response.request.url.raw_path.decode().split("?")[0]
        paths = [path for pattern, path in self.templates if pattern.fullmatch(url_path)]
        assert len(paths) == 1, f"{url_path} is not one documented path: {paths}"
        self.recorded.append(Recorded((paths[0], response.request.method), response))

    def seen(self, path: str, method: str, status: int) -> bool:
        return any(r.operation == (path, method) and r.response.status_code == status for r in self.recorded)

    def failures(self) -> list[str]:
        failures = []
        for recorded in self.recorded:
            path, method = recorded.operation
            response = recorded.response
            label = f"{method} {path} {response.status_code}"
            answer = openapi_document()["paths"][path][method.lower()]["responses"].get(str(response.status_code))
            if answer is None:
                failures.append(f"{label}: status not documented ({response.text[:200]})")
                continue
            if response.content and not answer.get("content"):
                failures.append(f"{label}: a body the document does not describe ({response.text[:200]})")
                continue
            try:
                self.schema[path][method].validate_response(response)
            except Failure as failure:
                failures.append(f"{label}:\n{failure}")
            except FailureGroup as group:  # several at once
                failures += [f"{label}:\n{failure}" for failure in group.exceptions]
        return failures


@pytest.fixture
def contract(api: Api) -> Contract:
    # A copy: whatever schemathesis does with the document, the app's own stays as it is served.
    checked = Contract(schemathesis.openapi.from_dict(copy.deepcopy(openapi_document())))
    api.client.event_hooks["response"].append(checked.record)
    return checked


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def admin_and_errors(api: Api) -> tuple[str, str, str]:
    """Two orgs (one with every nullable setting set), keys, top-ups, numbers, and the admin API's
    refusals. Returns (org, its key, the poor org's key)."""
    nullable_set = {
        "alert_webhook_url": "https://acme.test/alerts",
        "max_concurrent_calls": 2,
        "low_balance_threshold_pence": 100,
        "refusal_busy": "Busy, call back later.",
    }
    org, key = await api.new_org(5_000, **nullable_set)
    poor, poor_key = await api.new_org(10)
    again = {"org_id": org, "name": "x", "rate_pence_per_minute": 1}
    assert (await api.admin("POST", "/api/admin/orgs", again)).status_code == 409
    topups, topup, keyed = f"/api/admin/orgs/{org}/topups", {"amount_pence": 700}, {"Idempotency-Key": "t1"}
    for _ in range(2):  # the first, then its replay
        assert (await api.admin("POST", topups, topup, keyed)).status_code == 201
    assert (await api.admin("POST", topups, topup)).status_code == 400
    assert (await api.admin("POST", topups, {"amount_pence": 0}, {"Idempotency-Key": "t2"})).status_code == 422
    assert (await api.admin("POST", "/api/admin/orgs/nobody/topups", topup, keyed)).status_code == 404
    too_big = b'{"a": "' + b"x" * 20_000 + b'"}'
    assert (await api.client.post(topups, content=too_big, headers=ADMIN | keyed)).status_code == 413
    not_json = ADMIN | keyed | {"Content-Type": "text/plain"}
    assert (await api.client.post(topups, content=b"{}", headers=not_json)).status_code == 415
    assert (await api.client.get(f"/api/admin/orgs/{org}")).status_code == 401
    await api.register_number(org, "pn-main", assistant_id="asst-1")
    numbers = "/api/admin/phone-numbers"
    bare = await api.admin("POST", numbers, {"vapi_phone_number_id": "pn-bare", "org_id": org})
    assert (bare.status_code, bare.json()["number"], bare.json()["assistant_id"]) == (201, None, None)
    taken = await api.admin("POST", numbers, {"vapi_phone_number_id": "pn-main", "org_id": poor})
    nobody = await api.admin("POST", numbers, {"vapi_phone_number_id": "pn-new", "org_id": "nobody"})
    assert (taken.status_code, nobody.status_code) == (409, 404)
    spare = (await api.admin("POST", f"/api/admin/orgs/{org}/api-keys")).json()
    for status in (204, 404):  # revoked, then no longer there
        assert (await api.admin("DELETE", f"/api/admin/orgs/{org}/api-keys/{spare['key_id']}")).status_code == status
    assert (await api.admin("POST", "/api/admin/orgs/nobody/api-keys")).status_code == 404
    assert (await api.admin("PATCH", f"/api/admin/orgs/{org}", {"grace_seconds": 20})).status_code == 200
    assert (await api.admin("PATCH", f"/api/admin/orgs/{org}", {})).status_code == 422
    assert (await api.admin("GET", "/api/admin/orgs/nobody")).status_code == 404
    return org, key, poor_key


async def calls_and_webhooks(api: Api, rt: Runtime, org: str, key: str, poor_key: str) -> None:
    """A call reserved and live, a call through Vapi from assistant-request to its bill, and the
    refusals: short of credit, at the org's limit of calls, another org's call id."""
    for _ in range(2):  # the reservation, then its replay
        assert (await api.as_org(key, "POST", "/api/calls/out-1/reserve")).status_code == 201
    assert (await api.as_org(poor_key, "POST", "/api/calls/out-poor/reserve")).status_code == 402
    assert (await api.as_org(poor_key, "POST", "/api/calls/out-1/reserve")).json()["error"]["code"] == "call_taken"
    inbound = call("in-1", phone_number_id="pn-main")
    assert "assistantId" in (await api.vapi(assistant_request(inbound))).json()
    assert "error" in (await api.vapi(assistant_request(call("in-2", phone_number_id="pn-nobody")))).json()
    assert (await api.as_org(key, "POST", "/api/calls/out-2/reserve")).json()["error"]["code"] == "too_many_calls"
    assert (await api.vapi(status_update(inbound, "in-progress"))).json() == {}
    assert (await api.status_check("in-1")).json()["reason"] == "ok"
    assert (await api.status_check("never-seen")).json()["reason"] == "unknown_call"
    assert (await api.vapi(b'{"call_id": "bad{id}"}', "/api/vapi/webhook/status-check")).status_code == 422
    assert (await api.vapi(b'{"nothing": 1}')).status_code == 400
    unsigned = await api.client.post("/api/vapi/webhook", content=status_update(inbound, "in-progress"))
    assert unsigned.status_code == 401
    wallet = (await api.as_org(key, "GET", "/api/wallet")).json()
    admin_view = (await api.admin("GET", f"/api/admin/orgs/{org}")).json()
    assert wallet == {"org_id": org, **admin_view["wallet"], "currency": "GBP"}  # one wallet shape
    assert wallet["live_calls"] == 2
    assert len((await api.as_org(key, "GET", "/api/wallet/holds")).json()["items"]) == 2
    assert (await api.as_org(key, "GET", "/api/calls/in-1")).json()["status"] == "live"
    assert (await api.vapi(end_of_call_report(inbound, 125))).json() == {}
    assert (await api.status_check("in-1")).json()["reason"] == "call_ended"
    assert (await api.as_org(key, "GET", "/api/calls/in-1")).json()["status"] == "committed"  # Redis remembers
    await drain_org_fully(rt, org)
    await rt.redis.hdel(rt.keys.org(org).idem, call_state_key(org, "in-1"))
    assert (await api.as_org(key, "GET", "/api/calls/in-1")).json()["status"] == "committed"  # from call_holds
    assert (await api.as_org(key, "GET", "/api/calls/nothing")).status_code == 404
    assert (await api.as_org(key, "GET", "/api/calls/bad%7Bid%7D")).status_code == 422


async def numbers_ledger_and_alerts(api: Api, rt: Runtime, org: str, key: str, poor_key: str) -> None:
    """A number bought, one the provider failed to supply (refunded), one the org cannot afford;
    the ledger read in pages; alerts pending, delivered and failed; the secrets."""
    provision = "/api/managed-telephony/provision"
    bought = {"area_code": "415"}
    for _ in range(2):  # the purchase, then its replay
        assert (await api.as_org(key, "POST", provision, bought, {"Idempotency-Key": "n1"})).status_code == 201
    failing = {"area_code": "999"}  # the fake provider has no numbers there
    assert (await api.as_org(key, "POST", provision, failing, {"Idempotency-Key": "n2"})).status_code == 502
    assert (await api.as_org(poor_key, "POST", provision, {}, {"Idempotency-Key": "n3"})).status_code == 402
    assert (await api.as_org(key, "POST", provision, {})).status_code == 400
    assert (await api.as_org(key, "GET", "/api/managed-telephony/pricing")).status_code == 200
    await drain_org_fully(rt, org)
    page = (await api.as_org(key, "GET", "/api/wallet/transactions?limit=2")).json()
    kinds = [item["kind"] for item in page["items"]]
    while page["next_cursor"] is not None:
        page = (await api.as_org(key, "GET", f"/api/wallet/transactions?limit=2&cursor={page['next_cursor']}")).json()
        kinds += [item["kind"] for item in page["items"]]
    assert {"topup", "call_charge", "asset", "refund"} <= set(kinds)
    assert (await api.as_org(key, "GET", "/api/wallet/transactions?limit=0")).status_code == 422
    delivered, failed, _ = await add_alerts(rt, org, 3)
    set_delivered = "status = 'delivered', attempts = 1, delivered_at = now(), call_id = 'in-1'"
    set_failed = "status = 'failed', attempts = 3, last_error = 'HTTP 500'"
    for changes, alert_id in ((set_delivered, delivered), (set_failed, failed)):
        await rt.pg.execute(f"UPDATE alert_events SET {changes} WHERE idempotency_key = $1", alert_id)
    assert len((await api.as_org(key, "GET", "/api/alerts")).json()["alerts"]) == 3
    assert (await api.as_org(key, "GET", "/api/alerts/signing-secret")).status_code == 200
    assert (await api.as_org(key, "GET", "/api/forwarding/secret")).status_code == 200


async def placed_calls(
    api: Api, org: str, key: str, poor_key: str, vapi_api: FakeVapiApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outbound calls through the engine: without VAPI_API_KEY, then placed (and replayed), at the
    limit, short of credit, on no number of the org's, refused by Vapi, unanswered by Vapi."""
    calls = "/api/calls"
    body = {"phone_number_id": "pn-main", "customer": {"number": "+15557654321"}, "assistant_id": "asst-1"}
    assert (await api.as_org(key, "POST", calls, body, {"Idempotency-Key": "c1"})).status_code == 503
    ctx = api.client._transport.app.state.ctx  # type: ignore[attr-defined]
    monkeypatch.setattr(
        ctx,
        "settings",
        replace(ctx.settings, vapi_api_key=API_KEY, vapi_base_url=vapi_api.base_url, public_url="https://c.example"),
    )
    monkeypatch.setattr(dial_endpoint, "create_call_timeout_s", 0.3)
    for _ in range(2):  # placed, then its replay
        assert (await api.as_org(key, "POST", calls, body, {"Idempotency-Key": "c1"})).status_code == 201
    assert (await api.as_org(key, "POST", calls, body, {"Idempotency-Key": "c2"})).status_code == 429
    [placed] = vapi_api.calls.values()
    assert (await api.vapi(end_of_call_report(Call.model_validate(placed), 10))).json() == {}
    vapi_api.call_mode = "refuse"
    assert (await api.as_org(key, "POST", calls, body, {"Idempotency-Key": "c3"})).status_code == 502
    vapi_api.call_mode, vapi_api.hang_s = "hang", 1.0
    assert (await api.as_org(key, "POST", calls, body, {"Idempotency-Key": "c4"})).status_code == 504
    await api.register_number((await api.as_org(poor_key, "GET", "/api/wallet")).json()["org_id"], "pn-poor")
    poor = {**body, "phone_number_id": "pn-poor"}
    assert (await api.as_org(poor_key, "POST", calls, poor, {"Idempotency-Key": "c5"})).status_code == 402
    nobody = {**body, "phone_number_id": "pn-nobody"}
    assert (await api.as_org(key, "POST", calls, nobody, {"Idempotency-Key": "c6"})).status_code == 404
    assert (
        await api.as_org(key, "POST", calls, {**body, "customer": {}}, {"Idempotency-Key": "c7"})
    ).status_code == 422


async def health(api: Api, rt: Runtime) -> None:
    assert (await api.client.get("/healthz")).status_code == 200
    alone = await api.client.get("/readyz")  # no worker has reported: ready, the outbox degraded
    assert (alone.status_code, alone.json()["degraded"]) == (200, ["outbox"])
    stats = {"heartbeat_ms": int(time.time() * 1000), "outbox_oldest_age_ms": 0}
    await rt.redis.hset(rt.keys.worker_stats, mapping=stats)  # a worker has reported
    ready = await api.client.get("/readyz")
    assert (ready.status_code, ready.json()["degraded"]) == (200, [])
    assert (await api.client.get("/metrics")).status_code == 200


async def test_every_documented_answer_is_what_the_handlers_send(
    api: Api, rt: Runtime, contract: Contract, vapi_api: FakeVapiApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    org, key, poor_key = await admin_and_errors(api)
    await calls_and_webhooks(api, rt, org, key, poor_key)
    await numbers_ledger_and_alerts(api, rt, org, key, poor_key)
    await placed_calls(api, org, key, poor_key, vapi_api, monkeypatch)
    await health(api, rt)
    failures = contract.failures()
    assert failures == [], "\n\n".join(failures)
    # Every operation was asked, and answered with its success at least once.
    asked = {recorded.operation for recorded in contract.recorded}
    assert asked == documented_operations()
    successes = {(path, method, int(status)) for path, method, status, _ in documented_answers() if status[0] == "2"}
    assert {(path, method) for path, method, status in successes if contract.seen(path, method, status)} == asked
    # Every named response schema was checked against a real body at least once.
    named: dict[str, set[tuple[str, str, int]]] = {}
    for path, method, status, answer in documented_answers():
        for content in answer.get("content", {}).values():
            if "$ref" in content["schema"]:
                named.setdefault(content["schema"]["$ref"], set()).add((path, method, int(status)))
    unchecked = {name for name, uses in named.items() if not any(contract.seen(*use) for use in uses)}
    assert unchecked == set()
