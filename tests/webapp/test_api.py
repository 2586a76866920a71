"""Admin, wallet and provisioning endpoints: success, refusals, and bad input naming its field."""

import time

import pytest

from credit_engine.engine import limits
from credit_engine.engine.runtime import Runtime
from tests.webapp.conftest import Api
from tests.webapp.test_seed_scenarios import ledger_kinds, wallet


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (0, "invalid_field"),
        (-5, "invalid_field"),
        (1.5, "invalid_field"),
        (100.0, "invalid_field"),
        ("100", "invalid_field"),
        (True, "invalid_field"),
        (None, "missing_field"),
        (2**63, "invalid_field"),
        (2**64 + 1, "invalid_field"),
        (10**12 + 1, "invalid_field"),
        ([100], "invalid_field"),
    ],
)
async def test_bad_amounts_get_a_422_naming_the_field_and_change_nothing(api: Api, amount: object, code: str) -> None:
    org, key = await api.new_org(500)
    answer = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": amount}, headers={"Idempotency-Key": "k1"}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == answer.json()["error"] | {"code": code, "field": "amount_pence"}
    assert (await wallet(api, key))["balance_pence"] == 500
    # The key was not spent on a refused request.
    ok = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 1}, headers={"Idempotency-Key": "k1"}
    )
    assert ok.status_code == 201


async def test_a_huge_integer_in_raw_json_is_a_422_not_broken_json(api: Api) -> None:
    org, _ = await api.new_org()
    answer = await api.client.post(
        f"/api/admin/orgs/{org}/topups",
        content=b'{"amount_pence": 123456789012345678901234567890}',
        headers={
            "Authorization": f"Bearer {api.settings.admin_token}",
            "Idempotency-Key": "k",
            "Content-Type": "application/json",
        },
    )
    assert (answer.status_code, answer.json()["error"]["field"]) == (422, "amount_pence")


async def test_bodies_that_are_not_json_objects_or_too_big_are_refused(api: Api) -> None:
    org, _ = await api.new_org()
    auth = {"Authorization": f"Bearer {api.settings.admin_token}", "Idempotency-Key": "k"}
    path = f"/api/admin/orgs/{org}/topups"
    cases = [
        (b"not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
        (b"[1]", {"Content-Type": "application/json"}, 400, "invalid_request"),
        (b'{"amount_pence": 1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (b'{"amount_pence": 1, "x": 2}', {"Content-Type": "application/json"}, 422, "unknown_field"),
        (b'{"a": "' + b"x" * 20_000 + b'"}', {"Content-Type": "application/json"}, 413, "body_too_large"),
        (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, 400, "invalid_json"),
    ]
    for body, headers, status, code in cases:
        answer = await api.client.post(path, content=body, headers=auth | headers)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), body[:40]


async def test_org_creation_and_settings(api: Api) -> None:
    created = await api.admin(
        "POST", "/api/admin/orgs", {"org_id": "acme", "name": "Acme", "rate_pence_per_minute": 12}
    )
    assert created.status_code == 201
    assert created.json() | {} == created.json() | {
        "org_id": "acme",
        "min_start_pence": 12,
        "overdraft_pence": 0,
        "hold_block_minutes": 5,
        "grace_seconds": 10,
    }
    again = await api.admin("POST", "/api/admin/orgs", {"org_id": "acme", "name": "Acme", "rate_pence_per_minute": 12})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "org_exists")
    changed = await api.admin(
        "PATCH",
        "/api/admin/orgs/acme",
        {"rate_pence_per_minute": 30, "max_concurrent_calls": 3, "alert_webhook_url": "https://acme.test/alerts"},
    )
    assert changed.status_code == 200
    assert (changed.json()["rate_pence_per_minute"], changed.json()["min_start_pence"]) == (30, 30)
    shown = (await api.admin("GET", "/api/admin/orgs/acme")).json()
    assert (shown["max_concurrent_calls"], shown["wallet"]["balance_pence"]) == (3, 0)
    assert (await api.admin("GET", "/api/admin/orgs/nobody")).status_code == 404
    for bad, field in (
        ({"org_id": "a}b", "name": "x", "rate_pence_per_minute": 1}, "org_id"),
        ({"org_id": "ok2", "name": "x", "rate_pence_per_minute": 0}, "rate_pence_per_minute"),
        ({"org_id": "ok3", "name": "x"}, "rate_pence_per_minute"),
        ({"org_id": "ok4", "name": "x", "rate_pence_per_minute": 1, "grace_seconds": 301}, "grace_seconds"),
        (
            {"org_id": "ok5", "name": "x", "rate_pence_per_minute": 1, "alert_webhook_url": "ftp://x"},
            "alert_webhook_url",
        ),
    ):
        answer = await api.admin("POST", "/api/admin/orgs", bad)
        assert (answer.status_code, answer.json()["error"]["field"]) == (422, field), bad
    assert (await api.admin("PATCH", "/api/admin/orgs/acme", {"rate_pence_per_minute": "fast"})).status_code == 422
    assert (await api.admin("PATCH", "/api/admin/orgs/acme", {})).status_code == 422


async def test_topup_replays_return_the_first_response(api: Api) -> None:
    org, key = await api.new_org()
    first = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 700}, headers={"Idempotency-Key": "t1"}
    )
    assert first.status_code == 201
    assert first.json() | {} == {
        "transaction_id": first.json()["transaction_id"],
        "balance_pence": 700,
        "available_pence": 700,
        "applied": True,
    }
    await api.admin("POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 50}, headers={"Idempotency-Key": "t2"})
    replay = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 700}, headers={"Idempotency-Key": "t1"}
    )
    assert (replay.status_code, replay.json(), replay.headers["Idempotent-Replayed"]) == (201, first.json(), "true")
    other = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 701}, headers={"Idempotency-Key": "t1"}
    )
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_key_reused")
    missing = await api.admin("POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 1})
    assert (missing.status_code, missing.json()["error"]["field"]) == (400, "Idempotency-Key")
    assert (await wallet(api, key))["balance_pence"] == 750
    assert (
        await api.admin("POST", "/api/admin/orgs/nobody/topups", {"amount_pence": 1}, headers={"Idempotency-Key": "x"})
    ).status_code == 404


async def test_phone_numbers_belong_to_one_org(api: Api) -> None:
    org_a, _ = await api.new_org()
    org_b, _ = await api.new_org()
    await api.register_number(org_a, "pn-1", assistant_id="asst-a")
    await api.register_number(org_a, "pn-1", assistant_id="asst-a2")  # re-registering, same org
    taken = await api.admin("POST", "/api/admin/phone-numbers", {"vapi_phone_number_id": "pn-1", "org_id": org_b})
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "number_taken")
    nobody = await api.admin("POST", "/api/admin/phone-numbers", {"vapi_phone_number_id": "pn-2", "org_id": "nobody"})
    assert nobody.status_code == 404


async def test_reserve_for_an_outbound_call(api: Api) -> None:
    _, key = await api.new_org(1000)
    first = await api.as_org(key, "POST", "/api/calls/out-1/reserve")
    assert (first.status_code, first.json()["hold_pence"], first.json()["max_duration_seconds"]) == (201, 300, 1000)
    again = await api.as_org(key, "POST", "/api/calls/out-1/reserve")
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()["hold_pence"]) == (201, "true", 300)
    holds = (await api.as_org(key, "GET", "/api/wallet/holds")).json()["items"]
    assert [(h["call_id"], h["hold_pence"]) for h in holds] == [("out-1", 300)]
    assert (await api.as_org(key, "GET", "/api/calls/out-1")).json()["status"] == "live"
    poor_org, poor_key = await api.new_org(10)
    short = await api.as_org(poor_key, "POST", "/api/calls/out-2/reserve")
    assert (short.status_code, short.json()["error"]["code"]) == (402, "insufficient_balance")
    bad = await api.as_org(key, "POST", "/api/calls/bad%7Bid%7D/reserve")
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "call_id")


async def test_transaction_pages_are_stable_while_new_entries_arrive(api: Api) -> None:
    org, key = await api.new_org()
    for i in range(5):
        await api.admin(
            "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": i + 1}, headers={"Idempotency-Key": f"t{i}"}
        )
    first = (await api.as_org(key, "GET", "/api/wallet/transactions?limit=2")).json()
    await api.admin("POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 99}, headers={"Idempotency-Key": "late"})
    second = (await api.as_org(key, "GET", f"/api/wallet/transactions?limit=2&cursor={first['next_cursor']}")).json()
    third = (await api.as_org(key, "GET", f"/api/wallet/transactions?limit=2&cursor={second['next_cursor']}")).json()
    amounts = [i["amount_pence"] for page in (first, second, third) for i in page["items"]]
    assert amounts == [5, 4, 3, 2, 1]  # no entry twice, none skipped, the late one on no old page
    for bad in ("limit=0", "limit=201", "limit=x", "cursor=%%%", "cursor=MA"):
        answer = await api.as_org(key, "GET", f"/api/wallet/transactions?{bad}")
        assert answer.status_code == 422, bad


async def test_a_provider_failure_refunds_exactly_once_and_answers_502(api: Api) -> None:
    org, key = await api.new_org(1500)
    failed = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", {"area_code": "999"}, headers={"Idempotency-Key": "buy-1"}
    )
    assert (failed.status_code, failed.json()["error"]["code"]) == (502, "provider_failed")
    assert failed.json()["error"]["refunded_pence"] == 1000
    replay = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", {"area_code": "999"}, headers={"Idempotency-Key": "buy-1"}
    )
    assert (replay.status_code, replay.json(), replay.headers["Idempotent-Replayed"]) == (502, failed.json(), "true")
    assert (await wallet(api, key))["balance_pence"] == 1500
    assert await ledger_kinds(api, org) == [("topup", 1500), ("refund", 1000), ("asset", -1000)]


async def test_health_readiness_and_metrics(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    alone = await api.client.get("/readyz")
    assert alone.status_code == 200, alone.text  # a web process on its own decides: it is ready
    assert alone.json()["checks"]["outbox"] == "no worker has reported yet"
    assert alone.json()["degraded"] == ["outbox"]
    rt = await Runtime.open(api.settings)
    try:
        now_ms = int(time.time() * 1000)
        await rt.redis.hset(
            rt.keys.worker_stats,
            mapping={"heartbeat_ms": now_ms, "outbox_oldest_age_ms": 1200, "entries_written": 42, "outbox_entries": 7},
        )
        ready = await api.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        expected = {"redis": "ok", "postgres": "ok", "state": "ok", "outbox": "ok", "outbox_lag_ms": 1200}
        assert (ready.json()["checks"], ready.json()["degraded"]) == (expected, [])
        await rt.redis.hset(rt.keys.worker_stats, "outbox_oldest_age_ms", 61_000)
        behind = await api.client.get("/readyz")
        assert (behind.status_code, behind.json()["checks"]["outbox"], behind.json()["degraded"]) == (
            200,
            "behind",
            ["outbox"],
        )
        await rt.redis.hset(rt.keys.worker_stats, mapping={"outbox_oldest_age_ms": 0, "heartbeat_ms": now_ms - 120_000})
        silent = await api.client.get("/readyz")  # a silent worker is a lagging ledger: reported, still ready
        assert (silent.status_code, silent.json()["checks"]["outbox"]) == (200, "behind")
    finally:
        await rt.close()
    _, key = await api.new_org(100)
    await api.as_org(key, "POST", "/api/calls/c1/reserve")
    text = (await api.client.get("/metrics")).text
    assert 'credit_engine_decisions_total{operation="reserve",outcome="ok"} 1.0' in text
    assert "credit_engine_outbox_entries 7.0" in text
    assert "credit_engine_postgres_up 1.0" in text
    assert "ledger_entries_written" not in text and "worker_events" not in text  # the worker's own (worker/metrics.py)
    assert 'credit_engine_request_seconds_count{endpoint="call_reserve"} 1.0' in text


async def test_unknown_paths_and_methods_answer_json(api: Api) -> None:
    missing = await api.client.get("/api/nothing-here")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    wrong = await api.client.delete("/api/wallet")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")


async def test_100_concurrent_provisions_against_a_balance_for_one(api: Api) -> None:
    import asyncio

    org, key = await api.new_org(1000)
    answers = await asyncio.gather(
        *[
            api.as_org(key, "POST", "/api/managed-telephony/provision", {}, headers={"Idempotency-Key": f"buy-{i}"})
            for i in range(100)
        ]
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] + [402] * 99
    assert (await wallet(api, key))["balance_pence"] == 0
    assert await ledger_kinds(api, org) == [("topup", 1000), ("asset", -1000)]


async def test_a_provider_failure_with_the_longest_key_is_still_refunded(api: Api) -> None:
    org, key = await api.new_org(5000)
    long_key = "k" * 255  # the longest Idempotency-Key there is
    failed = await api.as_org(
        key, "POST", "/api/managed-telephony/provision", {"area_code": "999"}, headers={"Idempotency-Key": long_key}
    )
    assert (failed.status_code, failed.json()["error"]["refunded_pence"]) == (502, 1000)
    assert (await wallet(api, key))["balance_pence"] == 5000
    assert await ledger_kinds(api, org) == [("topup", 5000), ("refund", 1000), ("asset", -1000)]


async def test_inputs_that_once_made_a_500_are_4xx(api: Api) -> None:
    import base64

    org, key = await api.new_org(100)
    huge_cursor = base64.urlsafe_b64encode(b"99999999999999999999999").decode().rstrip("=")
    for path in (f"/api/wallet/transactions?cursor={huge_cursor}", "/api/wallet/transactions?limit=%C2%B2"):
        answer = await api.as_org(key, "GET", path)
        assert answer.status_code == 422, path
    for body, field in (
        ({"name": "bad\x00name"}, "name"),
        ({"alert_webhook_url": "https://x.test/\x00"}, "alert_webhook_url"),
    ):
        answer = await api.admin("PATCH", f"/api/admin/orgs/{org}", body)
        assert (answer.status_code, answer.json()["error"]["field"]) == (422, field)
    assert (await api.admin("DELETE", f"/api/admin/orgs/{org}/api-keys/key%00x")).status_code == 404
    # A top-up beyond the balance limit is refused and does not spend its key.
    from credit_engine.engine import limits

    for i in range(10):
        await api.admin(
            "POST",
            f"/api/admin/orgs/{org}/topups",
            {"amount_pence": limits.amount_pence_max},
            headers={"Idempotency-Key": f"big-{i}"},
        )
    big = {"amount_pence": limits.amount_pence_max}
    over = await api.admin("POST", f"/api/admin/orgs/{org}/topups", big, headers={"Idempotency-Key": "over"})
    assert (over.status_code, over.json()["error"]["field"]) == (422, "amount_pence")
    again = await api.admin("POST", f"/api/admin/orgs/{org}/topups", big, headers={"Idempotency-Key": "over"})
    assert again.status_code == 422  # refused again, not "still in progress"


async def test_a_claim_finished_by_an_older_release_is_replayed_verbatim(api: Api, rt: Runtime) -> None:
    """Before migration 0006 a claim kept the HTTP answer; after it, the engine's result, which the
    web app maps (webapp/answers.py). A key finished before the upgrade still replays its answer."""
    org, key = await api.new_org()
    first = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 300}, headers={"Idempotency-Key": "old"}
    )
    stored = await rt.pg.fetchval(
        "SELECT result FROM idempotent_requests WHERE org_id = $1 AND idempotency_key = 'old'", org
    )
    assert stored["outcome"] == "ok" and stored["transaction_id"] == first.json()["transaction_id"]
    legacy_body = {**first.json(), "note": "as an older release stored it"}
    await rt.pg.execute(
        "UPDATE idempotent_requests SET result = NULL, response_status = 201, response_body = $2 "
        "WHERE org_id = $1 AND idempotency_key = 'old'",
        org,
        legacy_body,
    )
    replay = await api.admin(
        "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": 300}, headers={"Idempotency-Key": "old"}
    )
    assert (replay.status_code, replay.json(), replay.headers["Idempotent-Replayed"]) == (201, legacy_body, "true")
    assert (await wallet(api, key))["balance_pence"] == 300


async def test_a_refused_top_up_spends_no_key(api: Api, rt: Runtime) -> None:
    """A top-up the engine refuses (it would take the balance over its bound) forgets its claim:
    the same key is neither replayed as a refusal nor a conflict for another amount."""
    org, key = await api.new_org()
    for n in range(limits.balance_pence_max // limits.amount_pence_max):
        topped = await api.admin(
            "POST",
            f"/api/admin/orgs/{org}/topups",
            {"amount_pence": limits.amount_pence_max},
            headers={"Idempotency-Key": f"big-{n}"},
        )
        assert topped.status_code == 201
    for amount in (1, 2):
        over = await api.admin(
            "POST", f"/api/admin/orgs/{org}/topups", {"amount_pence": amount}, headers={"Idempotency-Key": "k"}
        )
        assert (over.status_code, over.json()["error"]["field"]) == (422, "amount_pence"), over.text
        assert "Idempotent-Replayed" not in over.headers
        claimed = "SELECT count(*) FROM idempotent_requests WHERE org_id = $1 AND idempotency_key = 'k'"
        assert await rt.pg.fetchval(claimed, org) == 0
    assert (await wallet(api, key))["balance_pence"] == limits.balance_pence_max
